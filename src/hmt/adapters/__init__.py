"""Adapters shipped inside the package (data only): `hmt.io.shipped_adapter()` finds the default one."""
