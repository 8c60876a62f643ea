"""covid_tasks.dicom: others' files decoded or refused, chest films round-trip, no patient data leaks.

Every decode of a file runs in a worker process (``BoundedDecoder``): a hang kills the worker and
fails its test. The few in-process calls (the no-leak test needs ``caplog``) run under an alarm
that raises a ``BaseException``, which the decoder's ``except Exception`` cannot swallow.
"""

from __future__ import annotations

import io
import logging
import signal
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from pydicom.data.data_manager import DATA_ROOT

from covid_tasks import dicom
from tests.conftest import SAMPLE, SHARED_DATA
from tests.helpers.dicom_files import (
    PHI,
    WRITABLE,
    BoundedDecoder,
    bomb_dicom,
    film_dicom,
    grey_film,
    write_film,
)

PYDICOM_FILES = {p.name: p for p in sorted((Path(DATA_ROOT) / "test_files").rglob("*.dcm"))}
SAMPLE_PNG = SAMPLE / "images" / "thnov10p5641g006-c.png"  # the sample set's one grey PNG
SHARED_IMAGES = SHARED_DATA / "covid-chestxray" / "images"

_COLOUR = """
ExplVR_BigEnd.dcm GDCMJ2K_TextGBR.dcm SC_jpeg_no_color_transform.dcm
SC_jpeg_no_color_transform_2.dcm SC_rgb_dcmtk_+eb+cr.dcm SC_rgb_dcmtk_+eb+cy+n1.dcm
SC_rgb_dcmtk_+eb+cy+n2.dcm SC_rgb_dcmtk_+eb+cy+np.dcm SC_rgb_dcmtk_+eb+cy+s2.dcm
SC_rgb_dcmtk_+eb+cy+s4.dcm SC_rgb_gdcm_KY.dcm SC_rgb_jls_lossy_line.dcm SC_rgb_jls_lossy_sample.dcm
SC_rgb_jpeg.dcm SC_rgb_jpeg_app14_dcmd.dcm SC_rgb_jpeg_dcmd.dcm SC_rgb_jpeg_dcmtk.dcm
SC_rgb_jpeg_gdcm.dcm SC_rgb_jpeg_lossy_gdcm.dcm SC_rgb_rle.dcm SC_rgb_rle_16bit.dcm
SC_rgb_rle_32bit.dcm SC_rgb_small_odd.dcm SC_rgb_small_odd_big_endian.dcm SC_rgb_small_odd_jpeg.dcm
SC_ybr_full_422_uncompressed.dcm examples_jpeg2k.dcm examples_palette.dcm examples_rgb_color.dcm
""".split()
_MR_SMALL = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
             "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
             "MR_small_padded.dcm"]
#: What each of pydicom's test files must give: "decoded" or the refusal's reason, and why.
EXPECTED: dict[str, str] = {
    # grey single-frame images in a supported transfer syntax
    **dict.fromkeys(_MR_SMALL + ["693_J2KI.dcm", "CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "JPEG2000.dcm",
                                 "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm", "JPGExtended.dcm",
                                 "examples_overlay.dcm", "image_dfl.dcm"], "decoded"),
    # RGB, YBR and palette colour (chest films are grey), and multi-frame images
    **dict.fromkeys(_COLOUR + ["SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_rle_2frame.dcm",
                               "SC_rgb_rle_32bit_2frame.dcm", "examples_ybr_color.dcm"], "unsupported"),
    "meta_missing_tsyntax.dcm": "unsupported",  # no transfer syntax in the file meta
    # raw datasets without preamble and file meta; pixel data no pylibjpeg plugin decodes;
    # pixel data without Rows and Columns
    **dict.fromkeys(["ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "no_meta.dcm", "rtstruct.dcm",
                     "JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "nested_priv_SQ.dcm"],
                    "undecodable"),
    **dict.fromkeys(["MR_truncated.dcm", "rtplan_truncated.dcm"], "truncated"),
    # SR, RT plan/dose, waveform, segmentation, DICOMDIR; datasets without pixel data
    **dict.fromkeys(["reportsi.dcm", "reportsi_with_empty_number_tags.dcm", "test-SR.dcm", "rtplan.dcm",
                     "rtdose.dcm", "rtdose_1frame.dcm", "rtdose_expb.dcm", "rtdose_expb_1frame.dcm",
                     "rtdose_rle.dcm", "rtdose_rle_1frame.dcm", "badVR.dcm", "waveform_ecg.dcm",
                     "liver_1frame.dcm", "liver_expb_1frame.dcm", "DICOMDIR-empty.dcm", "UN_sequence.dcm",
                     "empty_charset_LEI.dcm", "no_meta_group_length.dcm", "priv_SQ.dcm"], "not_image"),
}

# (bits stored, VOI, rescale slope/intercept, signed): each is written in every transfer syntax
# and both photometric interpretations (8-bit JPEG Baseline has its own test).
DEPTHS = [
    (8, None, (1.0, 0.0), False),  # display values taken as they are
    (8, "window", (1.0, 0.0), False),
    (12, "window", (1.0, 0.0), False),  # 12 stored in 16, the 4 bits above full of noise
    (12, "lut", (1.0, 100.0), False),  # VOI LUT Sequence after a rescale
    (12, "window", (0.5, -1024.0), False),  # rescale, then a window in rescaled units
    (16, "window", (1.0, 0.0), False),
    (16, None, (1.0, 0.0), False),  # no VOI: the robust min-max
    (16, "window", (1.0, 0.0), True),  # signed
]
FILM_CASES = [
    pytest.param(ts, photometric, *depth, id=f"{ts}-{photometric[-1]}-{depth[0]}bit-{depth[1]}"
                 f"-{'rescale' if depth[2] != (1.0, 0.0) else 'identity'}{'-signed' if depth[3] else ''}")
    for ts in WRITABLE if ts != "jpeg_baseline"
    for photometric in ("MONOCHROME1", "MONOCHROME2")
    for depth in DEPTHS
    if not (ts == "jpeg_ls_near" and depth[3])  # CharLS refuses lossy signed 16-bit
]


class _Hung(BaseException):
    """Raised by the alarm; a BaseException, so no ``except Exception`` in the decoder hides it."""


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail an in-process test that runs for more than 60 s instead of letting it block."""
    def ring(signum: int, frame: Any) -> None:
        raise _Hung("still running after 60 s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def decoder() -> Iterator[BoundedDecoder]:
    worker = BoundedDecoder(timeout_s=60)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def film() -> np.ndarray:
    return grey_film(SAMPLE_PNG)


def _quietly(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a writer without its warnings (lower-case CS values and the like) in the test report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _assert_refusal(result: dict[str, Any]) -> str:
    """A refusal from the worker is a DicomError whose message starts with a known reason."""
    assert result["value_error"] and result["type"] in ("DicomError", "DicomTooLargeError"), result
    reason = result["message"].split(":", 1)[0]
    assert reason == result["reason"] and reason in dicom.REASONS, result
    return reason


def _min_max_expected(grey: np.ndarray, photometric: str) -> np.ndarray:
    """The documented rule without a VOI: the 0.5th/99.5th percentiles of the film to 0 and 255."""
    level = grey.astype(np.float64) if photometric == "MONOCHROME2" else 255.0 - grey
    low, high = np.percentile(level, [0.5, 99.5])
    out = np.clip(np.rint((level - low) * 255.0 / (high - low)), 0, 255)
    return 255.0 - out if photometric == "MONOCHROME1" else out


def test_pydicom_test_files_are_all_expected() -> None:
    assert len(PYDICOM_FILES) == 79
    assert set(EXPECTED) == set(PYDICOM_FILES)
    assert Counter(EXPECTED.values()) == {"decoded": 17, "unsupported": 34, "not_image": 19, "undecodable": 7,
                                          "truncated": 2}


@pytest.mark.parametrize("name", sorted(PYDICOM_FILES))
def test_pydicom_test_file_decoded_or_refused(name: str, decoder: BoundedDecoder) -> None:
    path = PYDICOM_FILES[name]
    result = decoder.decode(path)
    header = decoder.header(path)
    if not header["ok"]:
        _assert_refusal(header)
    if not result["ok"]:
        assert _assert_refusal(result) == EXPECTED[name]
        return
    assert EXPECTED[name] == "decoded"
    img = result["image"]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert header["ok"] and img.shape[:2] == (header["header"]["rows"], header["header"]["columns"])
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    if img.min() == img.max():
        source = decoder.source_range(path)
        assert source["ok"] and source["min"] == source["max"], f"{name} decodes flat, its source is not"


def test_one_image_in_eight_transfer_syntaxes_decodes_the_same(decoder: BoundedDecoder) -> None:
    images = {name: decoder.decode(PYDICOM_FILES[name]) for name in _MR_SMALL}
    reference = images["MR_small.dcm"]["image"]
    assert reference.std() > 20
    for name, result in images.items():
        assert result["ok"] and np.array_equal(result["image"], reference), name


@pytest.mark.parametrize("ts,photometric,bits,voi,rescale,signed", FILM_CASES)
def test_film_round_trips_within_one_level(ts: str, photometric: str, bits: int, voi: str | None,
                                           rescale: tuple[float, float], signed: bool, film: np.ndarray,
                                           decoder: BoundedDecoder, tmp_path: Path) -> None:
    path = write_film(tmp_path / "film.dcm", film, transfer_syntax=WRITABLE[ts], photometric=photometric,
                      bits_stored=bits, voi=voi, rescale=rescale, signed=signed, high_bit_noise=bits == 12,
                      modality="CR" if bits == 12 else "DX")
    result = decoder.decode(path)
    assert result["ok"], result
    expected = _min_max_expected(film, photometric) if voi is None and bits > 8 else film
    grey = result["image"][..., 0].astype(np.int64)
    assert np.abs(grey - expected).max() <= 1
    assert np.array_equal(result["image"][..., 0], result["image"][..., 2])


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_jpeg_baseline_film_decodes_like_pillow(photometric: str, film: np.ndarray, decoder: BoundedDecoder,
                                                tmp_path: Path) -> None:
    import pydicom
    from PIL import Image

    data = film_dicom(film, transfer_syntax=WRITABLE["jpeg_baseline"], photometric=photometric, voi=None)
    (tmp_path / "film.dcm").write_bytes(data)
    pixel_data = pydicom.dcmread(io.BytesIO(data)).PixelData
    frame = next(pydicom.encaps.generate_frames(pixel_data, number_of_frames=1))
    reference = np.asarray(Image.open(io.BytesIO(frame))).astype(np.int64)  # the lossy film as Pillow sees it
    reference = 255 - reference if photometric == "MONOCHROME1" else reference
    result = decoder.decode(tmp_path / "film.dcm")
    assert result["ok"], result
    assert np.abs(result["image"][..., 0].astype(np.int64) - reference).max() <= 1


@pytest.mark.skipif(not SHARED_IMAGES.is_dir(), reason="no shared data set")
@pytest.mark.parametrize("ts,photometric,bits,voi", [("j2k_lossless", "MONOCHROME1", 12, "window"),
                                                     ("jpeg_ls", "MONOCHROME2", 16, "window"),
                                                     ("rle", "MONOCHROME1", 8, None),
                                                     ("explicit", "MONOCHROME2", 12, "lut")])
def test_shared_grey_pngs_round_trip(ts: str, photometric: str, bits: int, voi: str | None,
                                     decoder: BoundedDecoder, tmp_path: Path) -> None:
    names = sorted(p.name for p in SHARED_IMAGES.glob("*.png"))[:40]
    films = []
    for name in names:
        try:
            films.append(grey_film(SHARED_IMAGES / name))
        except ValueError:
            continue  # a colour PNG
    assert len(films) >= 3
    for grey in films[:3]:
        path = write_film(tmp_path / "film.dcm", grey, transfer_syntax=WRITABLE[ts], photometric=photometric,
                          bits_stored=bits, voi=voi, modality="CR")
        result = decoder.decode(path)
        assert result["ok"], result
        assert np.abs(result["image"][..., 0].astype(np.int64) - grey).max() <= 1


@pytest.mark.parametrize("ts", ["explicit", "big_endian", "implicit", "rle", "j2k_lossless", "deflated"])
def test_every_cut_of_a_film_is_refused_with_a_reason(ts: str, decoder: BoundedDecoder,
                                                      tmp_path: Path) -> None:
    data = film_dicom(np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 256, transfer_syntax=WRITABLE[ts],
                      bits_stored=12)
    pixel_tag = b"\x7f\xe0\x00\x10" if ts == "big_endian" else b"\xe0\x7f\x10\x00"
    header_end = len(data) if ts == "deflated" else data.rindex(pixel_tag) + 24
    # every byte of the header and the start of the pixel data, then 40 cuts through the rest
    cuts = [0, 64, 131, *range(132, header_end), *range(header_end, len(data), max(1, len(data) // 40))]
    (tmp_path / "whole.dcm").write_bytes(data)
    whole = decoder.decode(tmp_path / "whole.dcm")["image"]
    reasons = {}
    for cut in cuts:
        (tmp_path / "cut.dcm").write_bytes(data[:cut])
        result = decoder.decode(tmp_path / "cut.dcm")
        if result["ok"]:  # only a pad byte gone (pydicom pads a deflated stream to even length)
            assert cut == len(data) - 1 and np.array_equal(result["image"], whole), cut
            continue
        reasons[cut] = _assert_refusal(result)
    assert reasons[0] == "empty" and reasons[64] == reasons[131] == "undecodable"  # no DICM
    assert {cut: r for cut, r in reasons.items() if cut >= 132 and r != "truncated"} == {}


def test_pixel_limit_is_enforced_from_the_header(alarm: None) -> None:
    data = bomb_dicom(65000, 65000)
    assert len(data) < 2000
    header = dicom.read_header(data)
    assert (header.rows, header.columns) == (65000, 65000)
    for call in (lambda: dicom.decode_dicom(data, 50_000_000), lambda: dicom.dicom_size(data, 50_000_000)):
        with pytest.raises(dicom.DicomTooLargeError) as info:
            call()
        assert (info.value.width, info.value.height, info.value.max_pixels) == (65000, 65000, 50_000_000)
        assert info.value.reason == "pixel_limit" and str(info.value).startswith("pixel_limit: ")
    with pytest.raises(dicom.DicomError, match="^truncated: "):  # no limit: refused, nothing allocated
        dicom.decode_dicom(data, None)


@pytest.mark.parametrize("ts,marker,offset", [("j2k_lossless", b"\xff\x4f\xff\x51", 8),
                                              ("jpeg_ls", b"\xff\xf7", 5)])
def test_codestream_declaring_another_size_is_refused(ts: str, marker: bytes, offset: int, film: np.ndarray,
                                                      decoder: BoundedDecoder, tmp_path: Path) -> None:
    data = bytearray(film_dicom(film, transfer_syntax=WRITABLE[ts], bits_stored=12))
    at = data.index(marker) + offset
    if ts == "j2k_lossless":
        data[at:at + 4] = (60000).to_bytes(4, "big")  # Xsiz
    else:
        data[at:at + 2] = (60000).to_bytes(2, "big")  # SOF55 height
    (tmp_path / "bomb.dcm").write_bytes(bytes(data))
    result = decoder.decode(tmp_path / "bomb.dcm")
    assert not result["ok"] and _assert_refusal(result) == "undecodable"
    assert "codestream" in result["message"]


@pytest.mark.parametrize("extra,reason", [
    ({"PhotometricInterpretation": "RGB"}, "unsupported"),
    ({"NumberOfFrames": 2}, "unsupported"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.11"}, "not_image"),  # Basic Text SR
    ({"Rows": 0}, "undecodable"),
])
def test_header_refusals(extra: dict[str, Any], reason: str, film: np.ndarray, alarm: None) -> None:
    data = _quietly(film_dicom, film, extra=extra)
    with pytest.raises(dicom.DicomError) as info:
        dicom.decode_dicom(data, None)
    assert info.value.reason == reason and str(info.value).startswith(f"{reason}: ")


def test_read_header_decodes_no_pixels(film: np.ndarray, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       alarm: None) -> None:
    import pydicom.pixels

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a header read decoded pixels")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", refuse)
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(refuse))
    path = write_film(tmp_path / "film.dcm", film, transfer_syntax=WRITABLE["j2k_lossless"], bits_stored=12)
    header = dicom.read_header(path)
    assert (header.rows, header.columns, header.bits_stored, header.photometric) == (*film.shape, 12,
                                                                                     "MONOCHROME2")
    assert header.transfer_syntax_uid == WRITABLE["j2k_lossless"] and header.pixel_data == "PixelData"
    assert dicom.dicom_size(path, None) == (film.shape[1], film.shape[0])
    assert dicom.is_dicom(path) and dicom.is_dicom(path.read_bytes()) and not dicom.is_dicom(SAMPLE_PNG)


@pytest.mark.parametrize("tags,view", [
    ({"ViewPosition": "PA"}, "PA"),
    ({"ViewPosition": "AP"}, "AP"),
    ({"ViewPosition": "AP", "PatientPosition": "HFS"}, "AP Supine"),
    ({"ViewPosition": "ll"}, "L"),
    ({"ViewPosition": "RL"}, "L"),
    ({"ViewPosition": "LLD"}, "LLD"),
    ({}, ""),
    ({"ViewCodeSequence": [{"CodeMeaning": "postero-anterior"}]}, "PA"),
    ({"ViewPosition": "AP", "PatientOrientationCodeSequence": [{"CodeMeaning": "erect"}]}, "AP Erect"),
    ({"ViewPosition": "AP", "PatientOrientationCodeSequence": [
        {"CodeMeaning": "recumbent", "PatientOrientationModifierCodeSequence": [{"CodeMeaning": "supine"}]}]},
     "AP Supine"),
])
def test_header_metadata_view(tags: dict[str, Any], view: str, alarm: None) -> None:
    from pydicom.dataset import Dataset

    def dataset(value: Any) -> Any:
        if isinstance(value, list):
            return [dataset(item) for item in value]
        if isinstance(value, dict):
            ds = Dataset()
            for key, item in value.items():
                setattr(ds, key, dataset(item))
            return ds
        return value

    extra = {key: dataset(value) for key, value in tags.items() if key != "ViewPosition"}
    data = _quietly(film_dicom, np.zeros((4, 4), np.uint8), view_position=tags.get("ViewPosition"),
                    extra=extra)
    assert dicom.header_metadata(data)["view"] == view


@pytest.mark.parametrize("modality,expected", [("DX", "X-ray"), ("CR", "X-ray"), ("CT", "CT"), ("MR", "MR")])
def test_header_metadata_modality_and_patient_hash(modality: str, expected: str, alarm: None) -> None:
    data = film_dicom(np.zeros((4, 4), np.uint8), modality=modality)
    meta = dicom.header_metadata(data)
    assert meta["modality"] == expected and meta["body_part"] == "CHEST"
    assert meta["patient_hash"] == dicom.patient_hash(PHI["PatientID"]) != dicom.patient_hash("MRN-77310-ZR")
    assert meta["patient_hash"].startswith("dcm-") and PHI["PatientID"] not in meta["patient_hash"]
    assert dicom.patient_hash(PHI["PatientID"], key=b"site secret") != meta["patient_hash"]
    no_id = film_dicom(np.zeros((4, 4), np.uint8), patient={"PatientName": "Anon"})
    assert dicom.header_metadata(no_id)["patient_hash"] is None


def test_no_patient_data_in_returns_errors_or_logs(film: np.ndarray, caplog: pytest.LogCaptureFixture,
                                                   alarm: None) -> None:
    odd = {"BodyPartExamined": "chest", "PatientPosition": "hfs"}  # invalid (lower-case) code strings
    good = _quietly(film_dicom, film, bits_stored=12, view_position="pa", extra=odd)
    files = {
        "good": good,
        "jpeg_ls": _quietly(film_dicom, film, bits_stored=16, transfer_syntax=WRITABLE["jpeg_ls"], extra=odd),
        "cut_in_pixels": good[:len(good) - 1000],
        "cut_in_patient": good[:good.index(PHI["PatientName"].encode()) + 5],
        "colour": _quietly(film_dicom, film, extra={"PhotometricInterpretation": "RGB", **odd}),
        "bomb": bomb_dicom(),
        "garbage": good[:132] + bytes(range(256)) * 8,
    }
    import pydicom

    level = logging.getLogger("pydicom").level
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # the writers' own warnings about the lower-case values
    pydicom.config.debug(True, default_handler=False)  # pydicom now logs every element it reads
    outputs: list[str] = []
    calls = [lambda d: dicom.decode_dicom(d, 50_000_000), lambda d: dicom.read_header(d).as_dict(),
             dicom.header_metadata, lambda d: dicom.dicom_size(d, 50_000_000)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name, data in files.items():
                for call in calls:
                    try:
                        value = call(data)
                        outputs.append(repr(value.shape if isinstance(value, np.ndarray) else value))
                    except dicom.DicomError as exc:
                        outputs += [str(exc), repr(exc), repr(exc.args)]
                        assert name != "good", exc
        outputs += [f"{r.name} {r.getMessage()}" for r in caplog.records] + [str(w.message) for w in caught]
        text = "\n".join(outputs)
        for secret in [*PHI.values(), "Quixote", "Dulcinea", "Xavier"]:
            assert secret not in text
        assert not [r for r in caplog.records if r.name.startswith(("pydicom", "pylibjpeg"))]
        assert not caught
        assert "dcm-" in text and "truncated:" in text and "unsupported:" in text and "pixel_limit:" in text

        # the same file read by plain pydicom logs the patient's name: the assertions above can fail
        caplog.clear()
        pydicom.dcmread(io.BytesIO(good))
        assert "Quixote" in "\n".join(r.getMessage() for r in caplog.records)
    finally:
        pydicom.config.debug(False, default_handler=False)
        logging.getLogger("pydicom").setLevel(level)


def test_importing_the_decoder_stays_light() -> None:
    import subprocess
    import sys

    code = ("import sys, covid_tasks.dicom; heavy = {'pydicom', 'numpy', 'tensorflow'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2],
                   timeout=120)


def test_threads_decode_like_one(film: np.ndarray, caplog: pytest.LogCaptureFixture, alarm: None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    files = [_quietly(film_dicom, film, transfer_syntax=WRITABLE[ts], photometric=photometric, bits_stored=12,
                      extra={"BodyPartExamined": "chest"})
             for ts in ("explicit", "rle", "j2k_lossless", "jpeg_ls")
             for photometric in ("MONOCHROME1", "MONOCHROME2")]
    expected = [dicom.decode_dicom(data, None) for data in files]
    caplog.clear()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda data: dicom.decode_dicom(data, None), files))
            assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
