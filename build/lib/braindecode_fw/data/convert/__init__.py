"""Converters from raw/public dataset layouts into the prepared store (docs/data_format.md)."""
