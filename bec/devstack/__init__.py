"""The local stack: a moto server for S3/SQS and a PostgreSQL, for tests, the demo and `bec dev`."""
