"""`sam-hf serve`: a FastAPI app around one model.

```python
from sam_hf.apps.serve import ServeSettings, create_app

app = create_app("runs/demo", settings=ServeSettings(max_prompts=64))
```
"""

from __future__ import annotations

from ...core.rle import decode_rle, encode_rle  # the package's one COCO RLE codec; answers use compressed=False
from .app import create_app
from .requests import decode_png_mask, encode_png_mask
from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "decode_png_mask", "decode_rle", "encode_png_mask", "encode_rle"]
