"""Build hook: ship probes/lufreplay.bpf.c (where it is written and edited) inside the package as
lufreplay/probes/, so a wheel install can compile the recorder's BPF program. Everything else is in
pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROBES = Path(__file__).resolve().parent / "probes"


class BuildPyWithProbes(build_py):
    """build_py, plus the BPF C sources copied to <build>/lufreplay/probes/."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "lufreplay" / "probes"
        self.mkpath(str(target))
        for src in sorted(PROBES.glob("*.bpf.c")):
            self.copy_file(str(src), str(target / src.name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        out = list(super().get_outputs(include_bytecode))
        return out + [str(Path(self.build_lib) / "lufreplay" / "probes" / s.name) for s in PROBES.glob("*.bpf.c")]


setup(cmdclass={"build_py": BuildPyWithProbes})
