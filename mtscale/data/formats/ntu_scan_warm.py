"""Importing this module loads the compiled NTU scanner (``ntu_scan``) into the process.

``prepare --workers N`` preloads it in its forkserver (the reader's ``PRELOAD``), so every
worker forked from there starts with the scanner loaded; the parent, which only merges, never
pays for it.
"""

from mtscale.data.formats import ntu_scan

ntu_scan.warm_up()
