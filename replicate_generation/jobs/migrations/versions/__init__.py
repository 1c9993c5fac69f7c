"""The revisions, oldest first: v0001 adopts the tables made before migrations, v0002 adds
fencing."""
