"""Resolvers turn a request path into a storage and a key."""
