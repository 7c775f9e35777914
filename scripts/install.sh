#!/usr/bin/env bash
# Install crankllm as a systemd service on 64-bit Raspberry Pi OS or Debian (Bookworm,
# Trixie): Debian packages, the crankllm system user, a virtual environment in
# /opt/crankllm with llama-cpp-python built for this CPU, /etc/crankllm/crankllm.toml,
# the default model and the unit. Running it again changes only what differs.
#
# The decisions (which packages, groups, config action, build jobs, I2C advice) are
# made by appliance/install_steps.py, which has unit tests; this script does the work.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: sudo scripts/install.sh [OPTIONS]

Install or update crankllm as the systemd service crankllm.

Options:
  --uninstall     remove the service, the crankllm user, /opt/crankllm and the
                  prepared models; keep /etc/crankllm and the transcripts
  --purge         with --uninstall: also remove /etc/crankllm and /var/lib/crankllm
  --skip-model    do not prepare the default model (it needs the network once)
  --dry-run       print the commands that would change the system and the files
                  that would be written, and change nothing
  --root DIR      write every file under DIR instead of / (for tests; the same as
                  CRANKLLM_ROOT=DIR). Commands still run: useradd, usermod and
                  userdel get --prefix DIR, systemctl gets --root=DIR, and the
                  virtual environment made there is not relocatable.
  -h, --help      show this help

Environment:
  CRANKLLM_PYTHON  interpreter the virtual environment is made from (default python3)
  CMAKE_ARGS       extra CMake options for the llama.cpp build, added after the
                   installer's own -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON
  CMAKE_BUILD_PARALLEL_LEVEL
                   compile jobs for the llama.cpp build (default: as many as the
                   CPUs and the RAM allow, at about 700 MiB per job)
EOF
}

# --- paths and settings ------------------------------------------------------------

readonly service=crankllm
readonly service_user=crankllm
readonly prefix_dir=/opt/crankllm
readonly venv=$prefix_dir/venv
readonly command_link=/usr/local/bin/crankllm
readonly etc_dir=/etc/crankllm
readonly config=$etc_dir/crankllm.toml
readonly state_dir=/var/lib/crankllm
readonly models_dir=$state_dir/models
readonly transcripts_dir=$state_dir/transcripts
readonly unit=/etc/systemd/system/$service.service
readonly dropin_dir=/etc/systemd/system/$service.service.d
readonly groups_dropin=$dropin_dir/10-install-groups.conf
readonly build_dir=/var/tmp/crankllm-build
# Records of what the last run installed, so a second run can skip the work.
readonly llama_stamp=$venv/.crankllm-llama
readonly project_stamp=$venv/.crankllm-project
readonly config_record=$prefix_dir/crankllm.toml.sha256

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${CRANKLLM_PYTHON:-python3}
root=${CRANKLLM_ROOT:-}
dry_run=0
uninstall=0
purge=0
skip_model=0
warnings=()
# Scratch folder for files written before they are installed; removed on exit.
work_dir=
# Set when this run changed the program, config or unit, so a running service restarts.
updated=0

while [ $# -gt 0 ]; do
    case $1 in
        --uninstall) uninstall=1 ;;
        --purge) uninstall=1; purge=1 ;;
        --skip-model) skip_model=1 ;;
        --dry-run) dry_run=1 ;;
        --root)
            [ $# -ge 2 ] || { usage >&2; exit 64; }
            root=$2
            shift
            ;;
        --root=*) root=${1#--root=} ;;
        -h|--help) usage; exit 0 ;;
        *) printf 'error: unknown option %s\n\n' "$1" >&2; usage >&2; exit 64 ;;
    esac
    shift
done

# --- helpers -----------------------------------------------------------------------

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

warn() {
    printf 'warning: %s\n' "$*" >&2
    warnings+=("$*")
}

cleanup() {
    if [ -n "$work_dir" ]; then
        rm -rf "$work_dir"
    fi
}
trap cleanup EXIT

# Run a command that changes the system, or only print it under --dry-run.
run() {
    if [ "$dry_run" = 1 ]; then
        printf '    would run:'
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    "$@"
}

# Run a long, chatty command with its output copied to LOG and only the progress
# lines shown.
run_logged() {
    local log=$1
    shift
    if [ "$dry_run" = 1 ]; then
        run "$@"
        return 0
    fi
    "$@" 2>&1 | steps progress "$log"
}

steps() {
    # -P keeps appliance/ off sys.path, so its modules cannot shadow the standard library.
    "$host_python" -P "$src/appliance/install_steps.py" "$@"
}

# Print the path of a new empty file in $work_dir. It runs in a command
# substitution, so it keeps no state of its own: cleanup removes the folder.
new_temp_file() {
    mktemp "$work_dir/file.XXXXXX"
}

file_mode() { stat -c %a "$1"; }

# Copy FILE to DEST (a path under $root) with MODE unless it is already there.
# Returns 0 when it wrote (or would write) the file, 1 when DEST was up to date.
put_file() {
    local file=$1 dest=$2 mode=$3
    if [ -f "$dest" ] && cmp -s "$file" "$dest" && [ "$(file_mode "$dest")" = "$mode" ]; then
        return 1
    fi
    if [ "$dry_run" = 1 ]; then
        note "would write $dest"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" "$file" "$dest.crankllm-tmp"
    mv -f "$dest.crankllm-tmp" "$dest"
    note "wrote $dest"
}

put_text() {
    local text=$1 dest=$2 mode=$3 file
    file=$(new_temp_file)
    printf '%s' "$text" >"$file"
    put_file "$file" "$dest" "$mode"
}

# Create DIR with MODE, and give it to OWNER (uid:gid) when one is given.
make_dir() {
    local dir=$1 mode=$2 owner=${3:-}
    if [ ! -d "$dir" ]; then
        run mkdir -p "$dir"
    fi
    if [ ! -d "$dir" ] || [ "$(file_mode "$dir")" != "$mode" ]; then
        run chmod "$mode" "$dir"
    fi
    if [ -n "$owner" ] && { [ ! -d "$dir" ] || [ "$(stat -c %u:%g "$dir")" != "$owner" ]; }; then
        run chown "$owner" "$dir"
    fi
}

remove_path() {
    local path=$1
    if [ -e "$path" ] || [ -L "$path" ]; then
        run rm -rf "$path"
        [ "$dry_run" = 1 ] || note "removed $path"
    fi
}

# Print UID:GID of the service user from $root/etc/passwd; fail if it has no entry.
service_user_ids() {
    steps user-ids "$root/etc/passwd" "$service_user"
}

systemctl_root_args() {
    if [ -n "$root" ]; then
        printf '%s\n' "--root=$root"
    fi
}

prefix_args() {
    if [ -n "$root" ]; then
        printf '%s\n' --prefix "$root"
    fi
}

# --- preconditions -----------------------------------------------------------------

check_preconditions() {
    if [ -n "$root" ]; then
        case $root in
            /) root= ;;
            /*) [ -d "$root" ] || die "--root $root is not a directory" ;;
            *) die "--root needs an absolute path, not $root" ;;
        esac
        root=${root%/}
    fi
    if [ "$dry_run" = 0 ] && [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
        die "run this as root: sudo $0"
    fi
    if [ ! -f "$src/setup.cfg" ] || [ ! -f "$src/appliance/install_steps.py" ]; then
        die "$src is not a crankllm checkout (setup.cfg or appliance/install_steps.py missing)"
    fi

    if ! command -v python3 >/dev/null 2>&1; then
        [ "$dry_run" = 0 ] || die "python3 is missing; a real run would install it with apt-get"
        say "installing python3, which the installer itself needs"
        run apt-get update
        run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3
    fi
    host_python=$(command -v python3)
    work_dir=$(mktemp -d "${TMPDIR:-/tmp}/crankllm-install.XXXXXX")
    "$host_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "crankllm needs Python 3.11 or newer; $host_python is $("$host_python" -V 2>&1)"
}

check_platform() {
    local arch output lines line
    arch=$(dpkg --print-architecture)
    output=$(steps platform "${root:-/}" "$arch") || die "unsupported system; see the message above"
    mapfile -t lines <<<"$output"
    for line in "${lines[@]}"; do
        [ -z "$line" ] || warn "$line"
    done
}

# --- install steps -----------------------------------------------------------------

install_packages() {
    say "checking Debian packages"
    local probe=(build-essential cmake pkg-config python3-dev python3-venv i2c-tools
        python3-lgpio liblgpio-dev swig python3-systemd libsystemd-dev)
    local plan lists_updated=0
    if ! plan=$(apt-cache policy "${probe[@]}" 2>/dev/null | steps packages 2>/dev/null); then
        if [ "$dry_run" = 1 ]; then
            warn "the apt package lists are empty; a real run would run apt-get update first"
            return 0
        fi
        run apt-get update
        lists_updated=1
        plan=$(apt-cache policy "${probe[@]}" 2>/dev/null | steps packages) \
            || die "apt still lists no python3-venv after apt-get update; check /etc/apt/sources.list"
    fi

    local lines line
    mapfile -t lines <<<"$plan"
    local missing=${lines[0]}
    lgpio_mode=${lines[1]}
    for line in "${lines[@]:2}"; do
        [ -z "$line" ] || note "$line"
    done

    if [ -z "$missing" ]; then
        note "all needed packages are installed"
        return 0
    fi
    local -a packages
    read -r -a packages <<<"$missing"
    say "installing ${packages[*]}"
    [ "$lists_updated" = 1 ] || run apt-get update
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
}

create_user() {
    say "checking the $service_user user"
    if service_user_ids >/dev/null; then
        note "user $service_user exists"
    else
        local prefix
        mapfile -t prefix < <(prefix_args)
        run useradd "${prefix[@]}" --system --user-group \
            --home-dir "$state_dir" --no-create-home --shell /usr/sbin/nologin \
            --comment "crankllm appliance" "$service_user"
    fi
    service_ids=$(service_user_ids) || service_ids=$service_user:$service_user

    local output lines
    output=$(steps groups "$root/etc/group" "$src/systemd/crankllm.service" "$service_user")
    mapfile -t lines <<<"$output"
    present_groups=${lines[0]:-}
    missing_groups=${lines[1]:-}
    local to_join=${lines[2]:-}
    if [ -n "$to_join" ]; then
        local prefix
        mapfile -t prefix < <(prefix_args)
        run usermod "${prefix[@]}" --append --groups "${to_join// /,}" "$service_user"
    fi
    [ -z "$present_groups" ] || note "member of: $present_groups"
    if [ -n "$missing_groups" ]; then
        local line
        output=$(steps missing-groups "$missing_groups")
        mapfile -t lines <<<"$output"
        for line in "${lines[@]}"; do
            case $line in
                "warning: "*) warn "${line#warning: }" ;;
                *) note "${line#note: }" ;;
            esac
        done
    fi
}

make_directories() {
    say "creating folders"
    make_dir "$root$prefix_dir" 755
    make_dir "$root$etc_dir" 755
    make_dir "$root$etc_dir/conf.d" 755
    make_dir "$root$state_dir" 750 "$service_ids"
    make_dir "$root$models_dir" 750 "$service_ids"
}

make_venv() {
    say "checking the virtual environment $root$venv"
    local venv_python=$root$venv/bin/python
    if [ -x "$venv_python" ] && ! "$venv_python" -c '' 2>/dev/null; then
        warn "$root$venv was broken (an upgraded system Python?); it is made anew"
        remove_path "$root$venv"
    fi
    if [ -f "$root$venv/pyvenv.cfg" ] \
        && ! grep -qi '^include-system-site-packages *= *true' "$root$venv/pyvenv.cfg"; then
        note "$root$venv cannot see Debian's Python packages; it is made anew"
        remove_path "$root$venv"
    fi
    if [ -x "$venv_python" ]; then
        note "it exists"
        return 0
    fi
    note "creating it"
    # --system-site-packages lets the venv use python3-lgpio and python3-systemd from
    # apt; pip installs everything else into the venv (PEP 668 forbids pip outside one).
    run "$python" -m venv --system-site-packages "$root$venv"
}

build_llama() {
    local version signature cmake_args want
    version=$(steps pinned-version "$src/setup.cfg" llama-cpp-python)
    signature=$(steps cpu-signature)
    # GGML_NATIVE=ON compiles for this CPU's instruction set. llama.cpp turns it off by
    # default when SOURCE_DATE_EPOCH is set, so it is stated here.
    cmake_args="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON${CMAKE_ARGS:+ $CMAKE_ARGS}"
    want="llama-cpp-python==$version cpu=$signature cmake=$cmake_args"
    say "checking llama-cpp-python $version"
    if [ -f "$root$llama_stamp" ] && [ "$(cat "$root$llama_stamp")" = "$want" ]; then
        note "it is built for this CPU"
        return 0
    fi

    local output lines jobs hint line
    output=$(steps build-plan)
    mapfile -t lines <<<"$output"
    jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-${lines[0]}}
    hint=${lines[1]}
    for line in "${lines[@]:2}"; do
        [ -z "$line" ] || warn "$line"
    done

    local reinstall=()
    if [ -f "$root$llama_stamp" ]; then
        note "the CPU or the build options changed since the last build: rebuilding"
        reinstall=(--force-reinstall --no-deps)
    fi
    note "building it for this CPU with $jobs parallel compile job(s)"
    note "this takes $hint; progress follows"
    make_dir "$root$build_dir" 700
    local log=$root$build_dir/llama-cpp-python.log
    local started=$SECONDS
    # TMPDIR is on disk: Debian 13 mounts /tmp as a tmpfs, in RAM, which a 512 MB
    # Pi cannot spare for the build tree.
    # --no-cache-dir: a wheel cached by an earlier build may be for another CPU.
    # pip -v is what makes scikit-build-core print the Ninja steps the progress shows.
    run_logged "$log" env TMPDIR="$root$build_dir" CMAKE_ARGS="$cmake_args" \
        CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
        "$root$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir \
        --no-binary llama-cpp-python -v "${reinstall[@]}" "llama-cpp-python==$version" \
        || die "the llama-cpp-python build failed; the full log is $log"
    [ "$dry_run" = 1 ] || note "built in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
    updated=1
    put_text "$want" "$root$llama_stamp" 644 || true
    run rm -f "$log"
}

install_project() {
    local want
    want="$(steps source-digest "$src") extras=pi lgpio=${lgpio_mode:-unknown}"
    say "checking the crankllm package"
    if [ -f "$root$project_stamp" ] && [ "$(cat "$root$project_stamp")" = "$want" ]; then
        note "it is up to date"
        return 0
    fi
    note "installing it and its Python dependencies"
    make_dir "$root$build_dir" 700
    local stage=$root$build_dir/source
    # pip's setuptools build writes build/ and an .egg-info into the source folder, so
    # it builds a copy and leaves no root-owned files in the checkout.
    run rm -rf "$stage"
    [ "$dry_run" = 1 ] || steps copy-source "$src" "$stage"
    # Without PYPI=1, lgpio's setup.py links against a system liblgpio. Only the
    # "shared" mode has one; in "apt" mode pip builds lgpio only if python3-lgpio is
    # too old.
    local lgpio_env=(PYPI=1)
    if [ "${lgpio_mode:-}" = shared ]; then
        lgpio_env=()
    fi
    run env TMPDIR="$root$build_dir" "${lgpio_env[@]}" \
        "$root$venv/bin/python" -m pip install --disable-pip-version-check "${stage}[pi]" \
        || die "pip could not install crankllm; the lines above name the package that failed"
    put_text "$want" "$root$project_stamp" 644 || true
    updated=1
    run rm -rf "$stage"
}

install_config() {
    say "installing the configuration"
    local example=$src/appliance/data/crankllm.toml
    config_state=$(steps config-action "$root$config" "$example" "$root$config_record")
    local record
    record=$(new_temp_file)
    steps sha256 "$example" >"$record"
    case $config_state in
        install|upgrade)
            put_file "$example" "$root$config" 644 || true
            updated=1
            put_file "$record" "$root$config_record" 644 || true
            ;;
        unchanged)
            note "$root$config is the current example"
            put_file "$record" "$root$config_record" 644 || true
            ;;
        new)
            put_file "$example" "$root$config.new" 644 || true
            warn "$root$config was edited, so it is kept; the new example is $root$config.new (compare them with diff)"
            ;;
        new-present)
            note "$root$config was edited and is kept; $root$config.new is the current example"
            ;;
        *) die "unexpected config action $config_state" ;;
    esac
}

install_unit() {
    say "installing the systemd unit"
    local changed=0
    if put_file "$src/systemd/crankllm.service" "$root$unit" 644; then
        changed=1
    fi
    local dropin
    dropin=$(steps groups-dropin "$present_groups" "$missing_groups")
    if [ -n "$dropin" ]; then
        if put_text "$dropin"$'\n' "$root$groups_dropin" 644; then
            changed=1
        fi
    elif [ -e "$root$groups_dropin" ]; then
        remove_path "$root$groups_dropin"
        changed=1
    fi
    if [ -d "$root$dropin_dir" ] && [ -z "$(ls -A "$root$dropin_dir")" ]; then
        run rmdir "$root$dropin_dir"
    fi
    if [ "$changed" = 1 ]; then
        updated=1
        [ -n "$root" ] || run systemctl daemon-reload
    fi
    local sysroot
    mapfile -t sysroot < <(systemctl_root_args)
    if systemctl "${sysroot[@]}" is-enabled --quiet "$service" 2>/dev/null; then
        note "$service is enabled"
    else
        run systemctl "${sysroot[@]}" enable "$service"
    fi
}

prepare_model() {
    if [ "$skip_model" = 1 ]; then
        note "skipping the model (--skip-model)"
        return 0
    fi
    say "preparing the default model in $root$models_dir"
    local prepare=("$venv/bin/crankllm" model prepare --system)
    if [ -n "$root" ]; then
        # STATE_DIRECTORY is how crankllm recognises a run as the service, so the
        # model goes to $root/var/lib/crankllm/models.
        prepare=(env STATE_DIRECTORY="$root$state_dir" "$root$venv/bin/crankllm" model prepare)
    fi
    if [ "$dry_run" = 1 ]; then
        run "${prepare[@]}"
    else
        # llama.cpp logs one line per tensor that falls back to another type (180 for
        # the default model); the count and the model summary that follow repeat it.
        "${prepare[@]}" 2>&1 | sed -u '/-> falling back to/d' \
            || die "preparing the model failed; the lines above show the cause (--skip-model skips this step)"
    fi
    run chown -R "$service_ids" "$root$models_dir"
}

check_i2c() {
    say "checking I2C for the display"
    local output lines line
    output=$(steps i2c "${root:-/}")
    mapfile -t lines <<<"$output"
    for line in "${lines[@]}"; do
        [ -z "$line" ] || warn "$line"
    done
}

restart_if_running() {
    # An update should take effect in a running appliance; a stopped one stays stopped.
    if [ "$updated" = 1 ] && [ -z "$root" ] && systemctl is-active --quiet "$service" 2>/dev/null; then
        say "restarting the running $service service"
        run systemctl try-restart "$service"
    fi
}

# Put `crankllm` on every user's PATH, so `crankllm status` works over ssh.
link_command() {
    local link="$root$command_link" target="$venv/bin/crankllm"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
        return
    fi
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        warn "$command_link exists and is not a link; crankllm stays at $target"
        return
    fi
    run mkdir -p "$(dirname "$link")"
    run ln -sfn "$target" "$link"
    [ "$dry_run" = 1 ] || note "linked $command_link to $target"
}

print_summary() {
    local args=(--root "${root:-/}" --venv "$venv" --config "$config" --config-state "$config_state"
        --unit "$unit" --transcripts "$transcripts_dir")
    [ "$skip_model" = 1 ] || args+=(--model "$models_dir/")
    [ "$dry_run" = 0 ] || args+=(--dry-run)
    local warning
    for warning in "${warnings[@]}"; do
        args+=(--warning "$warning")
    done
    echo
    steps summary "${args[@]}"
}

do_install() {
    check_platform
    install_packages
    create_user
    make_directories
    make_venv
    build_llama
    install_project
    link_command
    install_config
    prepare_model
    install_unit
    [ ! -d "$root$build_dir" ] || run rm -rf "$root$build_dir"
    check_i2c
    restart_if_running
    print_summary
}

# --- uninstall ---------------------------------------------------------------------

do_uninstall() {
    local sysroot
    mapfile -t sysroot < <(systemctl_root_args)
    say "removing the $service service"
    if [ -z "$root" ] && systemctl is-active --quiet "$service" 2>/dev/null; then
        run systemctl stop "$service"
    fi
    if [ -e "$root$unit" ] && systemctl "${sysroot[@]}" is-enabled --quiet "$service" 2>/dev/null; then
        run systemctl "${sysroot[@]}" disable "$service"
    fi
    local had_unit=0
    [ ! -e "$root$unit" ] || had_unit=1
    remove_path "$root$unit"
    remove_path "$root$dropin_dir"
    if [ "$had_unit" = 1 ] && [ -z "$root" ]; then
        run systemctl daemon-reload
    fi

    if service_user_ids >/dev/null; then
        say "removing the $service_user user"
        local prefix
        mapfile -t prefix < <(prefix_args)
        run userdel "${prefix[@]}" "$service_user"
    fi

    say "removing the program and the prepared models"
    if [ -L "$root$command_link" ] && [ "$(readlink "$root$command_link")" = "$venv/bin/crankllm" ]; then
        remove_path "$root$command_link"
    fi
    remove_path "$root$prefix_dir"
    remove_path "$root$models_dir"
    remove_path "$root$build_dir"

    if [ "$purge" = 1 ]; then
        say "removing the configuration and the transcripts (--purge)"
        remove_path "$root$etc_dir"
        remove_path "$root$state_dir"
        echo
        echo "crankllm is removed, with its configuration and transcripts."
    else
        echo
        echo "crankllm is removed. Kept:"
        [ ! -e "$root$etc_dir" ] || echo "  configuration  $root$etc_dir"
        [ ! -e "$root$transcripts_dir" ] || echo "  transcripts    $root$transcripts_dir (owned by the removed user's UID)"
        echo "Remove them too with: sudo scripts/install.sh --purge"
    fi
    echo "Debian packages installed for the build stay installed."
}

check_preconditions
if [ "$uninstall" = 1 ]; then
    do_uninstall
else
    do_install
fi
