"""dit_scale: train large sparse diffusion transformers (DiT-MoE) from a laptop CPU to GPU clusters.

Install with `bash launch/setup_env.sh` (creates ./.venv). It installs torch first, then DeepSpeed without build
isolation (its build imports torch; isolation would fetch a second, CUDA-sized torch), then this package.
"""
from setuptools import find_packages, setup

setup(
    name="dit_scale",
    version="0.1.0",
    description="Sparse diffusion transformers (DiT-MoE) at scale: expert parallelism, FSDP2/DeepSpeed, muP",
    packages=find_packages(include=["dit_scale", "dit_scale.*", "launch", "data_tools"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.13,<2.14",
        "deepspeed>=0.19,<0.20",
        "megatron-core>=0.16,<0.17",
        "webdataset>=1.0,<2",
        "braceexpand>=0.1.7,<1",
        "wandb>=0.19,<1",
        "omegaconf>=2.3,<2.5",
        "numpy>=1.26,<3",
        "pillow>=10,<14",
        "safetensors>=0.4,<1",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        # launch/evaluate.py: the gathered Inception features are a torchmetrics Metric (its distributed sync). Not
        # torch-fidelity: it imports torchvision, which cannot be installed beside the CPU torch, and once installed
        # without it `import torchmetrics` fails; dit_scale/evaluation/inception.py holds its Inception port.
        "torchmetrics>=1.4,<2",
    ],
    entry_points={"console_scripts": [      # the same main(argv) as `python launch/X.py` and `python -m launch.X`
        "dit-train = launch.train:main",
        "dit-sample = launch.sample:main",
        "dit-evaluate = launch.evaluate:main",
        "dit-analyze-experts = launch.analyze_experts:main",
        "dit-plot = launch.plot:main",
        "dit-export = launch.export:main",
        "dit-convert = launch.convert:main",
        "dit-upcycle = launch.upcycle:main",
        "dit-model-info = launch.model_info:main",
        "dit-bench = launch.bench:main",
        "dit-coord-check = launch.coord_check:main",
        "dit-sweep = launch.sweep:main",
        "dit-submit = launch.submit:main",
        "dit-make-synthetic = data_tools.make_synthetic:main",
        "dit-build-shards = data_tools.build_shards:main",
        "dit-make-text-encoder = data_tools.make_text_encoder:main",
    ]},
    extras_require={
        # tests/unit/test_mup.py also needs microsoft's `mup` (the μP reference); launch/setup_env.sh installs it with
        # --no-deps because its metadata asks for torchvision, pandas and seaborn, none of which it imports.
        # scipy: the tests' direct Fréchet distance (sqrtm); pytest-timeout: pytest.ini's per-test time limit
        "dev": ["pytest>=8,<10", "scipy>=1.11,<2", "pytest-timeout>=2.3,<3"],
        # data_tools/build_shards.py (VAE latents, DINOv2 features) and tests/unit/test_data_tools.py
        "data": ["diffusers>=0.30,<1", "transformers>=4.44,<6"],
    },
)
