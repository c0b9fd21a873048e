from setuptools import find_packages, setup

# Runtime dependencies, each for one job:
#   torch/torchvision  the models; torchvision also supplies the VGG-16 of LPIPS
#   numpy, scipy       sample batches, FID's matrix square root
#   pillow             image folders, PNG grids, editing masks
#   tqdm               progress bars on long loops
#   blobfile           paths on local disk or cloud buckets, as the published scripts use
#   mpi4py, mpich      `mpiexec -n K` multi-process runs; the mpich wheel ships the MPI runtime and mpiexec
#   lpips              the LPIPS distance's linear-layer weights (they ship inside the package)
#   torch-fidelity     the evaluator's Inception-v3: a port of the TF 2015-12-05 graph with TF1's bilinear resize
# diffusers, safetensors  optional ([diffusers] extra, and in [test]): scripts/convert_*_diffusers.py
# tensorboard, wandb  optional ([logging] extra, and in [test]): --log_backends tensorboard,wandb
# torch is left open above: on the project's machines pip's constraint file resolves it to the local 2.14.1.
setup(
    name="consistency-models",
    version="0.1.0",
    license="MIT",
    description="Consistency models (Song et al., ICML 2023): training, sampling and evaluation in PyTorch",
    packages=find_packages(include=["cm", "cm.*", "evaluations", "evaluations.*"]),
    # the embedded digits set; the digits classifier of evaluations/evaluator.py --features digits
    package_data={"cm": ["data/*.npz"], "evaluations": ["digits_classifier.pt"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "scipy>=1.10",
        "pillow>=10.1",
        "tqdm>=4.60",
        "blobfile>=1.0.5",
        "mpi4py>=4.0",
        "mpich>=4.3",
        "lpips>=0.1.4",
        "torch-fidelity>=0.3.0",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "ruff>=0.4", "diffusers>=0.25", "safetensors>=0.4", "tensorboard>=2.10",
                 "wandb>=0.15"],
        "diffusers": ["diffusers>=0.25", "safetensors>=0.4"],
        "logging": ["tensorboard>=2.10", "wandb>=0.15"],
    },
)
