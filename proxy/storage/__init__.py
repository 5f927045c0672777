"""Storages: where objects are read from (disk directories, S3 buckets)."""
