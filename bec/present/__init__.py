"""Presentation for people: pictures of the found lines (``gallery``) and the smoothed
pages/s that ``bec jobs stats --watch`` shows (``throughput``)."""
