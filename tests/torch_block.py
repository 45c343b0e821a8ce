"""A `python -c` script that imports the module named in argv[1] with torch blocked.

It fails if the import needs torch or if any torch module ends up loaded.
"""

BLOCK_TORCH = """
import importlib, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
        return None
sys.meta_path.insert(0, NoTorch())
importlib.import_module(sys.argv[1])
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded
"""
