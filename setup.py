"""medst_fast packaging.

``kernels/`` (the Triton ops) is installed as ``medst_fast.kernels``. It has no ``__init__.py`` on purpose: from
the repository root a regular package named ``kernels`` would shadow Hugging Face's ``kernels`` (which
transformers imports); as a namespace folder it is mapped below and bound by ``medst_fast/__init__.py`` where an
editable install cannot resolve it. The optional C++/CUDA extension
``medst_fast._C`` in ``csrc/`` is built with torch.utils.cpp_extension when torch is importable at build time
(``pip install --no-build-isolation -e .``, or ``python setup.py build_ext --inplace``); its CUDA kernels are
compiled only when nvcc and a CUDA build of torch are present. Any failure skips the extension with a message,
so installing never fails because of it; every op in it has a PyTorch fallback. Environment switches:
``MEDST_FAST_NO_EXT=1`` (skip the extension), ``MEDST_FAST_NO_CUDA_EXT=1`` (CPU kernels only),
``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0;10.0+PTX" when no GPU is visible), ``MAX_JOBS``.
CMakeLists.txt builds the same library outside setuptools.
"""
import glob
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def read_version():
    ns = {}
    with open(os.path.join(here, "medst_fast", "version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]




def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


BUILD_HINT = ("to build it: pip install --no-build-isolation . (torch installed first), or "
              "python setup.py build_ext --inplace in a source checkout")


def _say(msg):
    # pip hides a build's stdout/stderr unless -v, but shows the warnings the build backend raises: a skipped
    # extension is then a line the user sees, with how to build it.
    print(msg, file=sys.stderr)
    warnings.warn(msg, stacklevel=2)


def _tell(msg):
    # pip (without -v) captures the build's output and shows no warning either while it runs: a long compile
    # would look like a hang. The controlling terminal, when there is one, still reaches the user.
    _say(msg)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(msg + "\n")
    except OSError:  # no terminal (CI, a batch job): the captured line above is all there is
        pass


def _skip(reason, hint=True):
    _say(f"medst_fast: the C++/CUDA extension medst_fast._C is not built ({reason}); the PyTorch fallbacks "
         f"will be used" + (f"; {BUILD_HINT}" if hint else ""))
    return [], {}


def _load_ext_module():
    # medst_fast/ext.py by path: importing the package at build time would import all of it
    import importlib.util

    spec = importlib.util.spec_from_file_location("_medst_fast_ext_build", os.path.join(here, "medst_fast", "ext.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_build_stamp():
    # medst_fast/build_stamp.py by path, as _load_ext_module does
    import importlib.util

    spec = importlib.util.spec_from_file_location("_medst_fast_build_stamp",
                                                  os.path.join(here, "medst_fast", "build_stamp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _set_cuda_archs(nvcc):
    """Set TORCH_CUDA_ARCH_LIST, unless the user did, to the visible GPUs' architectures, or "8.0;9.0;10.0+PTX"
    without one, less what this nvcc and torch reject (medst_fast.ext.choose_cuda_archs), and say which;
    False (CPU kernels only) when they accept none. A list either rejects fails the whole build."""
    archs, why = _load_ext_module().build_arch_list(nvcc)
    if archs is None:
        _say(f"medst_fast: building medst_fast._C without CUDA kernels: {why}")
        return False
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"medst_fast: compiling the CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} ({why})", file=sys.stderr)
    return True


def extension_build():
    """(ext_modules, cmdclass) for medst_fast._C, or ([], {}) with a message when it cannot be built."""
    if _flag("MEDST_FAST_NO_EXT"):
        return _skip("MEDST_FAST_NO_EXT is set", hint=False)
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # the usual case under pip's build isolation
        return _skip(f"torch is not importable at build time, as in pip's isolated build environment: "
                     f"{type(e).__name__}: {e}")
    csrc = "csrc"
    if not os.path.isfile(os.path.join(here, csrc, "ops.cpp")):
        return _skip("csrc/ops.cpp not found (a source distribution made without MANIFEST.in?)")
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else shutil.which("nvcc")
    with_cuda = bool(torch.version.cuda) and bool(nvcc) and os.path.exists(nvcc) and not _flag("MEDST_FAST_NO_CUDA_EXT")
    # at::parallel_for expands to an OpenMP region in the header, so the CPU kernel needs -fopenmp itself.
    cxx = ["-O3", "-fopenmp"]
    sources = [os.path.join(csrc, "ops.cpp")]
    kw = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], include_dirs=[os.path.join(here, csrc)])
    if with_cuda:
        with_cuda = _set_cuda_archs(nvcc)
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(csrc, "*.cu")))
        # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper such as /usr/local/bin/nvcc gives a root
        # without lib64/, so also link against the first toolkit that really has libcudart.
        roots = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
        for root in filter(None, roots):
            if glob.glob(os.path.join(root, "lib64", "libcudart.so*")):
                kw["library_dirs"] = [os.path.join(root, "lib64")]
                kw["include_dirs"].append(os.path.join(root, "include"))
                break
        cxx.append("-DMEDST_FAST_WITH_CUDA")
        kw["extra_compile_args"]["nvcc"] = ["-O3", "-DMEDST_FAST_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension("medst_fast._C", sources, **kw)
    else:
        print("medst_fast: building medst_fast._C without CUDA kernels "
              f"(torch CUDA {torch.version.cuda}, nvcc {nvcc or 'not found'})", file=sys.stderr)
        ext = cpp_extension.CppExtension("medst_fast._C", sources, **kw)

    stamp_mod = _load_build_stamp()
    all_sources = sorted(glob.glob(os.path.join(here, csrc, "*")))
    fp = stamp_mod.fingerprint(all_sources, torch.__version__, torch.version.cuda,
                               {"cuda": with_cuda, "sources": sources, "args": kw["extra_compile_args"],
                                "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "ninja": bool(shutil.which("ninja"))})

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Skips the extension, with a message, instead of failing the install. Compiles in a persistent
        folder (build/medst_fast_ext/, so ninja recompiles only changed objects), and not at all for an
        in-place (editable) build whose library is up to date (medst_fast/build_stamp.py)."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(here, "build", "medst_fast_ext", "temp")

        def run(self):
            so = self.get_ext_fullpath(ext.name)
            stamp = os.path.join(here, "build", "medst_fast_ext", "_C.stamp.json")
            if self.inplace and not self.force and stamp_mod.is_up_to_date(stamp, so, fp):
                _tell(f"medst_fast: medst_fast._C is up to date ({os.path.basename(so)}: same sources, flags and "
                     f"torch {torch.__version__}); not recompiling")
                return
            _tell(f"medst_fast: compiling the C++{'/CUDA' if with_cuda else ''} extension medst_fast._C (about "
                 "1-2 minutes; MEDST_FAST_NO_EXT=1 skips it, the PyTorch fallbacks then run)")
            try:
                super().run()
            except Exception as e:  # compiler missing, CUDA/torch mismatch, ...
                _say(f"medst_fast: building medst_fast._C failed ({type(e).__name__}: {e}); continuing "
                     f"without it, the PyTorch fallbacks will be used")
                self.extensions = []
                return
            if os.path.isfile(so):
                stamp_mod.write_stamp(stamp, so, fp)

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

        def get_output_mapping(self):
            return super().get_output_mapping() if self.extensions else {}

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=bool(shutil.which("ninja")))}


ext_modules, cmdclass = extension_build()
# medst_fast.kernels is named explicitly: find_packages skips kernels/, a folder without __init__.py.
packages = find_packages(include=["medst_fast", "medst_fast.*"]) + ["medst_fast.kernels"]

setup(
    name="medst_fast",
    version=read_version(),
    description="Fast, faithful Med-ST (ICML 2024) chest X-ray vision-language pretraining",
    long_description=open(os.path.join(here, "README.md")).read() if os.path.exists(os.path.join(here, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"medst_fast.kernels": "kernels"},
    package_data={"medst_fast": ["model_configs/*.json"]},
    # core: import medst_fast, build and load models (safetensors), tokenise (tokenizers)
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4", "tokenizers>=0.15"],
    extras_require={
        # prepare (run by the trainer on its built-in synthetic data) reads the MIMIC CSVs with pandas; train
        # also brings what the quick start's figure (matplotlib) and `python -m medst_fast.eval` (scikit-learn)
        # need, so one install serves the README's first hour and the extension is compiled once
        "train": ["pillow>=9", "tqdm", "pandas>=1.5", "pydicom>=2.4", "matplotlib>=3.5", "scikit-learn>=1.2"],
        "eval": ["pillow>=9", "tqdm", "scikit-learn>=1.2", "pydicom>=2.4", "pandas>=1.5"],
        "plot": ["matplotlib>=3.5", "pillow>=9"],  # grounding overlays (medst_fast.grounding.plot_overlay)
        "parquet": ["pyarrow>=12", "pandas>=1.5"],  # python -m medst_fast.embed --out FILE.parquet
        "tensorboard": ["tensorboard>=2.10"],  # --report-to tensorboard
        "wandb": ["wandb>=0.15"],  # --report-to wandb
        "dali": ["nvidia-dali-cuda130"],
        # timm and transformers only for the interop tests (tests/test_convert_interop.py)
        "dev": ["pytest>=7", "pillow>=9", "tqdm", "pandas>=1.5", "scikit-learn>=1.2", "pydicom>=2.4",
                "matplotlib>=3.5", "pyarrow>=12", "timm>=1.0", "transformers>=4.40"],
    },
    entry_points={"console_scripts": ["medst-pretrain=medst_fast.pretrain:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
