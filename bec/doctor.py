"""`python -m bec.doctor`: report which optional native pieces this host has.

Operators run it when a worker is slower than expected or refuses TIFF pages: it says
whether JPEG goes through libturbojpeg, whether Pillow can read Group 4 TIFF, which
accelerator torch sees, and whether ocr jobs have Tesseract and its Tibetan data.
"""
from __future__ import annotations


def report() -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        from turbojpeg import TurboJPEG

        TurboJPEG()
        found["turbojpeg"] = "ok"
    except Exception as exc:  # the library is optional: Pillow decodes JPEG too
        found["turbojpeg"] = f"missing ({type(exc).__name__}); JPEG decodes through Pillow"
    try:
        import PIL
        from PIL import features

        tiff = "with libtiff" if features.check("libtiff") else "WITHOUT libtiff (no Group 4 TIFF)"
        found["pillow"] = f"{PIL.__version__} {tiff}"
    except ImportError:
        found["pillow"] = "missing"
    try:
        import torch

        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        found["torch"] = f"{torch.__version__}, {cuda} CUDA device(s)"
    except ImportError:
        found["torch"] = "missing (pip install -e '.[ldv1]')"
    try:
        import cv2

        found["opencv"] = cv2.__version__
    except ImportError:
        found["opencv"] = "missing"
    try:
        import tesserocr

        from bec.errors import BadInput
        from bec.ocr.tesseract import find_language_data

        version = tesserocr.tesseract_version().splitlines()[0]
        try:
            found["tesseract"] = f"{version}, bod.traineddata in {find_language_data('bod')}"
        except BadInput as exc:
            found["tesseract"] = f"{version}; {exc}"
    except ImportError:
        found["tesseract"] = "missing (pip install -e '.[ocr]')"
    return found


def main() -> None:
    for name, state in report().items():
        print(f"{name:10s} {state}")


if __name__ == "__main__":
    main()
