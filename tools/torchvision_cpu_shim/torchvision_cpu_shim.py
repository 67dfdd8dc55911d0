"""torchvision 0.28 on PyPI is built against CUDA torch; beside the CPU build of torch 2.13 its
`torchvision._meta_registrations` module fails at import ("operator torchvision::nms does not
exist"), which makes `import torchvision` (and diffusers / transformers imports that pull it in)
fail. Nothing this project uses needs those registrations (the reference models are pure Python),
so an empty stand-in module is put in their place. Loaded at interpreter start by the .pth file of
this package; only the development venv (requirements-dev.txt) installs it."""
import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
