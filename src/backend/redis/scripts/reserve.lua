-- Reserves one connection of a user, cluster-wide, within a cap: the
-- check and the increment are one atomic step, so concurrent connects on
-- any nodes can never exceed the cap.
-- KEYS: the user's conns hash, nodes, boots.
-- ARGV: this node's incarnation ("<node>|<boot>"), cap.
-- Counts the reservations of live incarnations: this one, and any whose
-- node has a live lease (Redis clock) and whose boot is the node's current
-- one. Entries of a node that restarted (another boot) or that has been
-- dead long enough to leave the nodes set are deleted; entries of a node
-- whose lease just lapsed are kept but not counted (it may come back).
-- Returns {1, count with this one} when reserved, {0, count} when full.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local kv = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #kv, 2 do
  local field, n = kv[i], tonumber(kv[i + 1])
  if field == ARGV[1] then
    total = total + n
  else
    local node, boot = string.match(field, '^(.*)|([^|]*)$')
    local lease = node and redis.call('ZSCORE', KEYS[2], node)
    local current = node and redis.call('HGET', KEYS[3], node)
    if (not lease) or current ~= boot then
      redis.call('HDEL', KEYS[1], field)
    elseif tonumber(lease) >= now then
      total = total + n
    end
  end
end
if total >= tonumber(ARGV[2]) then return {0, total} end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return {1, total + 1}
