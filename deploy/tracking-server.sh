#!/usr/bin/env bash
# The team's MLflow tracking server (docs/shared-tracking-server.md). Runs, params and metrics go
# to PostgreSQL; artifacts (models, curves, plots) are stored by the server and proxied to clients
# as mlflow-artifacts:/ URIs, so a client needs the server's URL and nothing else: no database
# password, no bucket credentials.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db.example.lan:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=/srv/mlflow/artifacts deploy/tracking-server.sh
#
# Settings are environment variables named as `mlflow server` names them, so they mean the same
# thing with or without this script:
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER@HOST:PORT/DB (required). Leave the password out:
#                                 a URI is visible in `ps` to every user of the machine; libpq
#                                 reads it from PGPASSWORD or ~/.pgpass (chmod 600).
#   MLFLOW_ARTIFACTS_DESTINATION  a folder (created if missing) or s3://bucket/prefix, whose
#                                 credentials only the server holds. Default /srv/mlflow/artifacts.
#   MLFLOW_HOST, MLFLOW_PORT      default 127.0.0.1 and 5000: put a TLS reverse proxy in front, or
#                                 set MLFLOW_HOST=0.0.0.0 on a trusted network.
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers accepted besides localhost and private IPs, e.g.
#                                 mlflow.example.lan,mlflow.example.lan:* (mlflow's DNS-rebinding guard).
#   MLFLOW_WORKERS                server processes (default 4).
#   MLFLOW_AUTH=basic             users and passwords: mlflow's basic-auth app. Needs
#                                 MLFLOW_AUTH_CONFIG_PATH (an ini file; the default keeps users in
#                                 ./basic_auth.db of whatever folder the server starts in) and, on
#                                 first start, MLFLOW_AUTH_ADMIN_PASSWORD; and a fixed
#                                 MLFLOW_FLASK_SERVER_SECRET_KEY. Needs pip install 'mlflow[auth]'.
#   MLFLOW_DB_WAIT_S              seconds to wait for the database to accept connections (default
#                                 30), for a server started at boot next to PostgreSQL.
#   MLFLOW_BIN                    the mlflow executable (default: mlflow on PATH, else ./.venv's).
# Further arguments go to `mlflow server` as they are.
set -euo pipefail

die() { echo "tracking-server: $*" >&2; exit 1; }

root="$(cd "$(dirname "$0")/.." && pwd)"
mlflow="${MLFLOW_BIN:-$(command -v mlflow || echo "$root/.venv/bin/mlflow")}"
[ -x "$mlflow" ] || die "no mlflow executable at $mlflow: set MLFLOW_BIN, or run 'make setup'"

db="${MLFLOW_BACKEND_STORE_URI:-}"
case "$db" in
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver cnnlab installs
    # (the `server` extra) is psycopg2, so name it.
    postgresql://*) db="postgresql+psycopg2://${db#*://}" ;;
    postgresql+psycopg2://*) ;;
    "") die "set MLFLOW_BACKEND_STORE_URI=postgresql://USER@HOST:PORT/DB" ;;
    *) die "MLFLOW_BACKEND_STORE_URI must be postgresql://... (got ${db%%://*}://...)" ;;
esac
# The driver lives next to mlflow; without it the server dies with a long traceback.
python="$(dirname "$mlflow")/python"
if [ -x "$python" ] && ! "$python" -c 'import psycopg2' 2>/dev/null; then
    die "$python cannot import psycopg2: pip install -e '.[server]' (or psycopg2-binary)"
fi

# Fail in one line when the database is down or refuses us, instead of in mlflow's traceback.
# pg_isready (Debian's postgresql-client) only says whether the server is up, not whether we may log in.
if command -v pg_isready >/dev/null 2>&1; then
    libpq_uri="postgresql://${db#*://}"   # libpq does not know the +psycopg2 dialect suffix
    wait_s="${MLFLOW_DB_WAIT_S:-30}"
    until pg_isready -q -d "$libpq_uri"; do
        [ "$wait_s" -gt 0 ] || die "PostgreSQL at ${db#*@} does not accept connections"
        wait_s=$((wait_s - 1)); sleep 1
    done
fi

artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-/srv/mlflow/artifacts}"
case "$artifacts" in
    *://*) ;;                                   # s3://, gs://, ...: the server's own credentials
    *) mkdir -p "$artifacts"; artifacts="$(cd "$artifacts" && pwd)" ;;  # absolute: stays put if the cwd changes
esac

auth=()
if [ "${MLFLOW_AUTH:-}" = basic ]; then
    [ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ] || die "MLFLOW_AUTH=basic needs MLFLOW_AUTH_CONFIG_PATH (docs/shared-tracking-server.md)"
    [ -r "$MLFLOW_AUTH_CONFIG_PATH" ] || die "cannot read MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_AUTH_CONFIG_PATH"
    # The UI's CSRF tokens are signed with this key; every worker (and every server behind one
    # proxy) needs the same one, so it cannot be made up here.
    [ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || die "MLFLOW_AUTH=basic needs MLFLOW_FLASK_SERVER_SECRET_KEY (e.g. openssl rand -hex 32)"
    if [ -x "$python" ] && ! "$python" -c 'import flask_wtf' 2>/dev/null; then
        die "the basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'"
    fi
    auth=(--app-name basic-auth)
fi

# --serve-artifacts without --default-artifact-root: new experiments get mlflow-artifacts:/ locations,
# which clients upload to and download from through this server. exec: the server gets our pid and
# our signals (systemd, Ctrl-C), with no shell in between.
exec "$mlflow" server \
    --backend-store-uri "$db" \
    --artifacts-destination "$artifacts" --serve-artifacts \
    --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-4}" \
    "${auth[@]}" "$@"
