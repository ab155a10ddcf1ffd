# Sourced by the i-PI examples' run.sh (bash): start i-PI on $IPI_INPUT (default input.xml) in the current
# directory, appending to ipi.log, and wait for its socket. Needs BIN (the venv's bin), SOCKET (/tmp/ipi_<address>) and RUN (for messages); sets IPI (its pid)
# and an EXIT trap that stops i-PI and removes the socket (the caller clears it with `trap - EXIT` when done).
start_ipi() {
  if [ -S "$SOCKET" ] || [ -e "$SOCKET" ]; then
    echo "removing stale socket $SOCKET"; rm -f "$SOCKET"
  fi
  "$BIN/i-pi" "${IPI_INPUT:-input.xml}" >> ipi.log 2>&1 &
  IPI=$!
  trap 'if kill -0 "$IPI" 2>/dev/null; then kill -TERM "$IPI"; wait "$IPI" || true; fi; rm -f "$SOCKET"' EXIT
  for _ in $(seq 1 600); do               # wait up to 60 s for i-PI's socket
    [ -S "$SOCKET" ] && break
    kill -0 "$IPI" 2>/dev/null || { echo "i-PI died, see $RUN/ipi.log"; tail -20 ipi.log; exit 1; }
    sleep 0.1
  done
  [ -S "$SOCKET" ] || { echo "i-PI did not create $SOCKET"; exit 1; }
}
