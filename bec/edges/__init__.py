"""The edges to the outside: everything that talks to S3 or turns bytes into pixels.

``aws`` makes the boto3 clients and translates AWS trouble into BEC's error kinds once;
``archive`` and ``localarchive`` read the image archive (on S3 or in a folder);
``imaging`` decodes page images; ``artifacts`` and ``volumefile`` write a volume's Parquet
and ``success.json``. Nothing here knows about tasks or queues.
"""
