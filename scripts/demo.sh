#!/usr/bin/env bash
# Set up crankllm in a virtual environment, prepare the default model and crank it:
# with the keyboard on a terminal, or with a scripted crank that writes demo.gif.
# Usage: ./scripts/demo.sh [extra crankllm simulate arguments]
set -euo pipefail
# shellcheck source=scripts/setup-env.sh
source "$(dirname "$0")/setup-env.sh"

check_prerequisites
install_project

step "preparing the default model (SmolLM2-135M-Instruct, requantized to Q2_K)"
"$venv/bin/crankllm" model prepare

if [ -t 0 ] && [ -t 1 ]; then
    step "starting the simulator: turn the crank with the arrow keys"
    exec "$venv/bin/crankllm" simulate "$@"
fi

step "no terminal: cranking a script and writing demo.gif"
exec "$venv/bin/crankllm" simulate \
    --script "60cw,8ccw,30cw,press,50cw" --rpm 30 \
    --display "gif:$repo/demo.gif" --print-story "$@"
