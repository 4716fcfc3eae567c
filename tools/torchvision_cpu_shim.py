"""Make PyPI's CUDA-built torchvision importable beside the CPU build of torch (dev venv only).

torchvision's compiled ops fail to load against a CPU torch, and its fake-tensor registrations
then raise "operator torchvision::nms does not exist", so `import torchvision` fails. ComfyUI
imports torchvision at start-up (cascade/cosmos modules) but the SD paths use only its pure-Python
parts. `--install` puts a tiny import hook into the venv (a .pth file): just before torchvision is
imported it declares the two op schemas whose absence breaks the import. It never touches an
environment where torchvision's ops load, and it lives only in this project's git-ignored .venv.
"""
import pathlib
import sys
import sysconfig

HOOK_MODULE = "_attn_edit_torchvision_shim"
HOOK_SOURCE = '''
import importlib.abc, sys

class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch
        global _LIBRARY  # a Library object undoes its definitions when garbage-collected
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                       "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
            try:
                _LIBRARY.define(schema)
            except RuntimeError:
                pass  # already defined: torchvision's own ops loaded
        return None

sys.meta_path.insert(0, _DeclareTorchvisionOps())
'''


def install() -> None:
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    (site / f"{HOOK_MODULE}.py").write_text(HOOK_SOURCE)
    (site / f"{HOOK_MODULE}.pth").write_text(f"import {HOOK_MODULE}\n")


if __name__ == "__main__" and "--install" in sys.argv:
    install()
    import subprocess
    check = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit("torchvision still fails to import:\n" + check.stderr[-2000:])
