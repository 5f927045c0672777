"""Fault tests: an S3 stand-in that stalls or cuts, and clients that vanish or stop reading."""
