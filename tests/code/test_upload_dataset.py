"""docker/upload_dataset.py against a real S3 server (SeaweedFS): links refused, content compared."""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers.s3_server import BUCKET, SeaweedS3, weed_binary

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.s3,
              pytest.mark.skipif(weed_binary() is None, reason="the weed binary is not installed")]


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("upload_dataset", REPO / "docker" / "upload_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def upload(server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Any:
    opts = server.s3_options()
    for var, key in (("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
                     ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                     ("AWS_ENDPOINT_URL", "endpoint_url"), ("AWS_DEFAULT_REGION", "region_name")):
        monkeypatch.setenv(var, opts[key])
    return _script().main


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (80, 80), value).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "metadata.csv").write_text("patientid,finding,view,modality,filename\n"
                                       "1,COVID-19,PA,X-ray,a.png\n")
    (root / "images" / "a.png").write_bytes(_png(10))
    (root / "images" / "b.png").write_bytes(_png(20))
    return root


def _keys(server: SeaweedS3, prefix: str) -> dict[str, bytes]:
    client = server.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for o in listed}


def test_symbolic_links_are_refused_and_nothing_is_sent(server: SeaweedS3, upload: Any, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """It once uploaded /etc/passwd through a link in the source folder."""
    src = _folder(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    (src / "images" / "passwd.png").symlink_to(secret)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "c.png").write_bytes(_png(30))
    (src / "images" / "linked-folder").symlink_to(tmp_path / "outside")
    prefix = server.new_prefix("links").split("/", 3)[3]
    assert upload([str(src), f"s3://{BUCKET}/{prefix}"]) == 1
    err = capsys.readouterr().err
    assert "passwd.png: a symbolic link" in err and "linked-folder: a symbolic link" in err
    assert "nothing uploaded: 2 entry(ies) refused" in err
    assert _keys(server, prefix) == {}


def test_changed_content_of_the_same_size_is_sent_again(server: SeaweedS3, upload: Any, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """It once skipped an object whose size alone matched."""
    src = _folder(tmp_path / "src")
    prefix = server.new_prefix("content").split("/", 3)[3]
    uri = f"s3://{BUCKET}/{prefix}"
    assert upload([str(src), uri]) == 0
    assert "uploaded 3 file(s), 0 unchanged" in capsys.readouterr().out
    assert set(_keys(server, prefix)) == {"metadata.csv", "images/a.png", "images/b.png"}

    new = _png(99)
    assert len(new) == (src / "images" / "a.png").stat().st_size  # same size, other bytes
    (src / "images" / "a.png").write_bytes(new)
    assert upload([str(src), uri]) == 0
    assert "uploaded 1 file(s), 2 unchanged" in capsys.readouterr().out
    assert _keys(server, prefix)["images/a.png"] == new

    # an object put by another tool (no sha256 metadata) is compared by its ETag (MD5);
    # hidden files are not data, as pull ignores them
    (src / "images" / ".DS_Store").write_bytes(b"finder")
    server.client().put_object(Bucket=BUCKET, Key=f"{prefix}/images/b.png", Body=_png(20))
    server.client().put_object(Bucket=BUCKET, Key=f"{prefix}/metadata.csv", Body=b"other,bytes\n")
    assert upload([str(src), uri]) == 0
    assert "uploaded 1 file(s), 2 unchanged" in capsys.readouterr().out
    assert _keys(server, prefix)["metadata.csv"] == (src / "metadata.csv").read_bytes()
    assert os.environ["AWS_ENDPOINT_URL"] == server.endpoint
