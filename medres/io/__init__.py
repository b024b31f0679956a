"""Reading pixels: DICOM (dicom.py), PNG/JPEG (raster.py), sniff + dispatch (load.py), cache.

Nothing here imports torch.
"""

from medres.io.cache import ImageCache
from medres.io.load import decode_file, load_image, sniff
from medres.io.record import Geometry, LoadedImage, PreprocessSpec, Record

__all__ = ["Geometry", "ImageCache", "LoadedImage", "PreprocessSpec", "Record", "decode_file", "load_image", "sniff"]
