"""ComfyUI nodes of the pack (V3 schema)."""
from .fpe import FPESelfAttnInject
from .invert import DDIMInvert, NullTextInversion
from .preview import AttentionMapPreview
from .p2p import P2PLocalBlend, P2PRefine, P2PReplace, P2PReweight
from .store import AttentionStore

NODES = [AttentionStore, P2PReplace, P2PRefine, P2PReweight, P2PLocalBlend, FPESelfAttnInject, DDIMInvert, NullTextInversion,
         AttentionMapPreview]
