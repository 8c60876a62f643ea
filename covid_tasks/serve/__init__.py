"""Inference service: HTTP API and web page serving the registry's ``champion`` (not a pipeline stage).

* :mod:`.app`: the FastAPI app and its endpoints;
* :mod:`.model_holder`: follows the alias, loads new versions in the background, swaps atomically;
* :mod:`.inputs`: upload checks and decoding with the training pipeline's ``load_image``;
* :mod:`.gradcam`: Grad-CAM heat maps on the backbone's last convolutional block;
* :mod:`.metrics`, :mod:`.limits`, :mod:`.settings`: Prometheus metrics, body-size limit, settings;
* :mod:`.headers`: security headers (Content-Security-Policy, nosniff, no framing), optional ``/docs``;
* ``static/``: the page at ``/`` (plain HTML, CSS and JavaScript; nothing loaded from elsewhere).
"""
