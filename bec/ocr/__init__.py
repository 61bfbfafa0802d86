"""The ``ocr`` job kind: Tibetan text from every page, with Tesseract, on BEC's engine.

fetch (S3 GET, decode to gray at the original's size) → ocr (one single-threaded Tesseract
per core, through tesserocr: no subprocess per call) → controller (Parquet, success.json).
With ``lines_from`` (a line-detection job's name) each page's lines come from that job's
Parquet for the same volume version: the corrected page is rebuilt, each line cut out and
read as one line; without it, Tesseract's own layout analysis reads the whole page.

Modules: ``config`` (the job config), ``kind`` (the :class:`bec.control.jobkinds.JobKind`),
``tesseract`` (the engine, its language data and identity), ``ldv1lines`` (reading a
line-detection job's output), ``cutting`` (lines cut out of the corrected page),
``engine`` (the OCR process), ``artifacts`` (the Parquet schema), ``quality`` (CER against
transcripts).
"""
