#!/usr/bin/env bash
# Faults for the Compose environment. Finds containers by the labels the rendered
# docker-compose.yml gives them, so it needs only the project name.
#
#   deploy/compose/fault.sh ACTION TARGET
#
#   ACTION  kill        SIGKILL (the container stays stopped: no restart policy)
#           pause       freeze every process (cgroup freezer): connections stay
#                       open and nothing answers, like a stalled machine
#           unpause
#           disconnect  cut the container off its cell's network (a router: off
#                       every network): a partition; peers and routers time out
#           connect     reconnect it, with its static address
#           restart     stop gracefully (if running) and start
#           heal        undo every fault: unpause, reconnect, start what is stopped
#   TARGET  member <cell> <id> | cell <cell> | router <id>
#
# The project is $COMPOSE_PROJECT_NAME (default: cellplane), as given to
# `docker-compose -p`.
set -euo pipefail

project=${COMPOSE_PROJECT_NAME:-cellplane}

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
action=$1
kind=$2
shift 2

filters=(--filter "label=com.docker.compose.project=$project")
case $kind in
    member)
        [[ $# -eq 2 ]] || usage
        filters+=(--filter label=cellplane.role=member --filter "label=cellplane.cell=$1" --filter "label=cellplane.id=$2")
        what="member $1/$2"
        ;;
    cell)
        [[ $# -eq 1 ]] || usage
        filters+=(--filter label=cellplane.role=member --filter "label=cellplane.cell=$1")
        what="cell $1"
        ;;
    router)
        [[ $# -eq 1 ]] || usage
        filters+=(--filter label=cellplane.role=router --filter "label=cellplane.id=$1")
        what="router $1"
        ;;
    *) usage ;;
esac

mapfile -t containers < <(docker ps -aq "${filters[@]}")
if [[ ${#containers[@]} -eq 0 ]]; then
    echo "fault: no container for $what in project $project (is it up? COMPOSE_PROJECT_NAME?)" >&2
    exit 1
fi

label() { docker inspect -f "{{index .Config.Labels \"$2\"}}" "$1"; }
state() { docker inspect -f '{{.State.Status}}' "$1"; }

# The project's network for cell $1.
network() {
    local name
    name=$(docker network ls -q --filter "label=com.docker.compose.project=$project" \
        --filter "label=com.docker.compose.network=$1" --format '{{.Name}}')
    echo "${name:-${project}_$1}"
}

# "network address" pairs a container belongs on.
placements() {
    local c=$1 role cell
    role=$(label "$c" cellplane.role)
    if [[ $role == member ]]; then
        cell=$(label "$c" cellplane.cell)
        echo "$(network "$cell") $(label "$c" cellplane.ip)"
    else
        docker inspect -f '{{range $k, $v := .Config.Labels}}{{$k}}={{$v}}{{"\n"}}{{end}}' "$c" |
            sed -n 's/^cellplane\.ip\.\([^=]*\)=\(.*\)$/\1 \2/p' |
            while read -r cell ip; do echo "$(network "$cell") $ip"; done
    fi
}

connected() {
    docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{"\n"}}{{end}}' "$1" | grep -qx "$2"
}

do_connect() {
    local c=$1 net ip
    while read -r net ip; do
        connected "$c" "$net" || docker network connect --ip "$ip" "$net" "$c"
    done < <(placements "$c")
}

do_disconnect() {
    local c=$1 net ip
    while read -r net ip; do
        if connected "$c" "$net"; then docker network disconnect --force "$net" "$c"; fi
    done < <(placements "$c")
}

for c in "${containers[@]}"; do
    s=$(state "$c")
    case $action in
        kill) if [[ $s == running || $s == paused ]]; then docker kill --signal KILL "$c" >/dev/null; fi ;;
        pause) if [[ $s == running ]]; then docker pause "$c" >/dev/null; fi ;;
        unpause) if [[ $s == paused ]]; then docker unpause "$c" >/dev/null; fi ;;
        disconnect) do_disconnect "$c" ;;
        connect) do_connect "$c" ;;
        restart)
            if [[ $s == paused ]]; then docker unpause "$c" >/dev/null; fi
            docker restart --time 10 "$c" >/dev/null
            ;;
        heal)
            if [[ $s == paused ]]; then docker unpause "$c" >/dev/null; fi
            do_connect "$c"
            s=$(state "$c")
            if [[ $s != running ]]; then docker start "$c" >/dev/null; fi
            ;;
        *) usage ;;
    esac
done
echo "fault: $action $what (${#containers[@]} container(s), project $project)"
