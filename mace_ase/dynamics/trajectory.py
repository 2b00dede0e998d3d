"""Trajectory files for the drivers: ASE ``.traj`` by default, extended XYZ by suffix.

``.traj`` (ASE's binary format) stores positions, momenta, cell and the calculator's
cached results (energy, forces, stress) without recomputing anything. ``.xyz`` and
``.extxyz`` write extended XYZ, appended frame by frame, readable by most viewers.
"""

from __future__ import annotations

from pathlib import Path

from ase import Atoms

EXTXYZ_SUFFIXES = (".xyz", ".extxyz")


class TrajectoryWriter:
    """Write frames to ``path``; the format follows the suffix (``.traj`` or ``.xyz``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix == ".traj":
            from ase.io.trajectory import Trajectory

            self._traj = Trajectory(str(self.path), "w")
            self._xyz = None
        elif suffix in EXTXYZ_SUFFIXES:
            self._traj = None
            self._xyz = open(self.path, "w")  # noqa: SIM115 -- kept open across writes, closed by close()
        else:
            raise ValueError(
                f"Unsupported trajectory suffix {suffix!r} in {str(path)!r}; use .traj (ASE) or .xyz/.extxyz."
            )

    def write(self, atoms: Atoms) -> None:
        if self._traj is not None:
            self._traj.write(atoms)
        else:
            from ase.io import write

            # .traj stores calc.parameters itself; extended XYZ gets the provenance in each frame's comment line
            added = {key: value for key, value in _provenance(atoms).items() if key not in atoms.info}
            atoms.info.update(added)
            try:
                write(self._xyz, atoms, format="extxyz")
            finally:
                for key in added:
                    del atoms.info[key]
            self._xyz.flush()

    def close(self) -> None:
        if self._traj is not None:
            self._traj.close()
        if self._xyz is not None:
            self._xyz.close()


PROVENANCE_KEYS = ("model", "model_sha256", "mace_ase_version", "torch_version", "device", "dtype")


def _provenance(atoms: Atoms) -> dict:
    """The calculator's record of what produced the results (see MACECalculator), as ``mace_<key>`` entries."""
    parameters = getattr(atoms.calc, "parameters", None) or {}
    return {f"mace_{key}": str(parameters[key]) for key in PROVENANCE_KEYS if key in parameters}


def last_good_path(trajectory: str | Path) -> Path:
    """``md.traj`` -> ``md.last_good.traj`` (same folder and format)."""
    path = Path(trajectory)
    return path.with_name(f"{path.stem}.last_good{path.suffix}")
