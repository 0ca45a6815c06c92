#!/bin/sh
# A fake SMG router for dstackctl's tests, one HTTP request per connection (run under
# `nc -ll -p 8000 -e sh /www/fake-smg-router.sh`). It keeps dstack's worker API:
# GET /workers, POST /workers (202 + worker_id), DELETE /workers/ID (202), GET /health;
# workers live in /tmp/workers (one JSON file each) and every call is appended to /tmp/calls.
reply() {
    printf 'HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
        "$1" "${#2}" "$2"
}
read -r method path _
length=0
while read -r line; do
    line=$(printf '%s' "$line" | tr -d '\r')
    [ -z "$line" ] && break
    case "$line" in [Cc]ontent-[Ll]ength:*) length=$(printf '%s' "${line#*:}" | tr -d ' ') ;; esac
done
body=""
[ "$length" -gt 0 ] && body=$(head -c "$length")
mkdir -p /tmp/workers
echo "$method $path $body" >> /tmp/calls
case "$method $path" in
"GET /health") reply "200 OK" '{}' ;;
"GET /workers")
    items=""
    for file in /tmp/workers/*; do
        [ -f "$file" ] && items="$items${items:+,}$(cat "$file")"
    done
    reply "200 OK" "{\"workers\":[$items]}"
    ;;
"POST /workers")
    id=$(cat /proc/sys/kernel/random/uuid)
    url=$(printf '%s' "$body" | sed -n 's/.*"url": *"\([^"]*\)".*/\1/p')
    key=$(printf '%s' "$body" | sed -n 's/.*"dstack.ai\/job-id": *"\([^"]*\)".*/\1/p')
    printf '{"id":"%s","url":"%s","labels":{"dstack.ai/job-id":"%s"}}' "$id" "$url" "$key" > "/tmp/workers/$id"
    reply "202 Accepted" "{\"status\":\"accepted\",\"worker_id\":\"$id\"}"
    ;;
"DELETE /workers/"*)
    id=${path#/workers/}
    if [ -f "/tmp/workers/$id" ]; then
        rm -f "/tmp/workers/$id"
        reply "202 Accepted" '{"status":"accepted"}'
    else
        reply "404 Not Found" '{"code":"WORKER_NOT_FOUND"}'
    fi
    ;;
*) reply "404 Not Found" '{}' ;;
esac
