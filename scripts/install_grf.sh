#!/usr/bin/env bash
# Install Google Research Football (gfootball 2.10.2) from source for maipg_grf.py.
#
# PyPI has only the sdist of gfootball: pip compiles its C++ engine (about 5 minutes on 2 idle cores, 11 on busy ones;
# ~0.8 GB of build files, ~1.6 GB peak memory). Debian/Ubuntu, run as root (or with sudo), with the
# Python environment that runs maipg_grf.py active. Safe to run again: it only installs what is missing.
#
#   bash scripts/install_grf.sh
#
# Pitfalls this recipe avoids:
#   - gfootball's build script runs a bare `python3 -c 'import psutil'`, so an isolated pip build fails:
#     psutil and the build tools go into this environment first, then --no-build-isolation.
#   - gym must be < 0.26 (0.26 changed reset()); gfootball imports six without declaring it.
#   - pip's wheel cache can hide a broken build step: --no-cache-dir makes pip build for real.
#   - the PyPI package `football-env` is an unofficial fork: not used.
set -euo pipefail

PYTHON="${PYTHON:-python3}"  # the environment that runs maipg_grf.py (gfootball's build calls python3 too)
GFOOTBALL_VERSION="2.10.2"

if "$PYTHON" -c "import gfootball.env, gfootball_engine" 2>/dev/null \
    && [ "$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("gfootball"))')" = "$GFOOTBALL_VERSION" ]; then
    echo "install_grf.sh: gfootball $GFOOTBALL_VERSION is already installed for $("$PYTHON" -c 'import sys; print(sys.executable)')"
    exit 0
fi

# 1. System packages: compiler, CMake, Python headers, OpenGL/EGL, SDL2 and Boost (the engine links them), and Mesa's
#    software OpenGL drivers, with which the engine renders off-screen for --capture-video on machines without a GPU.
APT_PACKAGES=(
    cmake build-essential python3-dev libgl1-mesa-dev libegl-dev libgl1-mesa-dri
    libsdl2-dev libsdl2-image-dev libsdl2-ttf-dev libsdl2-gfx-dev
    libboost-python-dev libboost-thread-dev libboost-system-dev libboost-filesystem-dev
)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "install_grf.sh: apt-get install ${missing[*]}"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

# 2. Python build and run-time dependencies, then the engine itself (compiled here, not taken from a cache).
"$PYTHON" -m pip install psutil setuptools wheel six "gym==0.23.1"
"$PYTHON" -m pip install --no-cache-dir --no-build-isolation "gfootball==$GFOOTBALL_VERSION"

# 3. Check that the compiled engine loads and a scenario runs one step; fail loudly otherwise.
"$PYTHON" - <<'EOF'
import gfootball.env as football_env

env = football_env.create_environment(
    env_name="academy_3_vs_1_with_keeper",
    representation="simple115v2",
    rewards="scoring,checkpoints",
    number_of_left_players_agent_controls=3,
)
obs = env.reset()
obs, reward, done, info = env.step([0, 0, 0])
env.close()
assert obs.shape == (3, 115), obs.shape
print("install_grf.sh: gfootball works (academy_3_vs_1_with_keeper, obs", obs.shape, ")")
EOF
