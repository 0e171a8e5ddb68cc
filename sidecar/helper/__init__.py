"""Helper mode: keep SVIDs and bundles as PEM files on disk for applications that read files."""
