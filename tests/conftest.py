"""Suite-wide test settings.

Two xdist workers share two cores: give each worker's torch one thread, or both oversubscribe the CPU and
the suite runs slower than serially. This must happen before anything imports torch.
"""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# Nothing may reach a model hub, in tests least of all.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
