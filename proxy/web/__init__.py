"""The HTTP layer: the media application and, later, the admin listener."""
