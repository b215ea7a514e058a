"""One reader module per raw source format (see README "Preparing data")."""
