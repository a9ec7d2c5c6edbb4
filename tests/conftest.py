import os

# Tests never reach a model hub: everything is built locally or ships with a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (README's `-n 2`) two workers share the cores: torch's default of one thread per core
# in each would oversubscribe them, and contended threads stall each other (measured here: several times
# slower). One thread per worker, inherited by the CLI runs the tests start; set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
