"""Data layer: raw formats -> preprocessing -> Zarr store + Parquet manifest -> loader."""
