-- fixed_window: at most `quota` units in each window of `window` microseconds, windows aligned
-- to the Unix epoch so that every replica and every Redis node agree on their edges.
--
-- KEY    a string "<window number>:<units admitted in it>".
-- ARGV   (the limit's slot in decide.lua) p1 = quota, p2 = window us, p3 unused.
-- Result allowed, remaining units, reset us (end of window), retry_after us,
--        receipt = the window number (what fixed_window_refund needs), new state, ttl.
-- TTL    until the window ends, plus the slack: a later window starts from zero anyway.
-- A clock that steps back keeps counting in the newest window seen (never reopens a window).
-- Trade-off: constant memory, but up to 2 x quota can pass around a window edge.
-- The window to count in at `now` (the newest seen) and its count so far.
local function fixed_window_state(key, now, window)
  local index = math.floor(now / window)
  local count = 0
  local v = redis.call('GET', key)
  if v then
    local i, n = string.match(v, '^(%d+):(%d+)$')
    local stored = tonumber(i)
    if stored >= index then
      index = stored
      count = tonumber(n)
    end
  end
  return index, count
end

local function fixed_window(key, now, quota, window, _, cost)
  local index, count = fixed_window_state(key, now, window)
  local reset = (index + 1) * window - now
  if reset < 0 then reset = 0 end
  if count + cost <= quota then
    return 1, quota - count - cost, reset, 0, index,
      string.format('%d:%d', index, count + cost), (index + 1) * window - now
  end
  local remaining = quota - count
  if remaining < 0 then remaining = 0 end
  return 0, remaining, reset, reset, 0
end

-- Gives back `cost` units admitted in window `receipt` (Redis Cluster: another slot of the same
-- request rejected it). A window that has moved on has nothing to give back.
local function fixed_window_refund(key, receipt, _quota, _window, _unused, cost)
  local v = redis.call('GET', key)
  if not v then return end
  local i, n = string.match(v, '^(%d+):(%d+)$')
  if tonumber(i) ~= receipt then return end
  n = tonumber(n) - cost
  if n < 0 then n = 0 end
  redis.call('SET', key, string.format('%d:%d', receipt, n), 'KEEPTTL')
end

-- Counts `cost` units more than were reserved in the current window, even past the quota (a
-- debt the rest of the window waits out).
local function fixed_window_charge(key, now, _quota, window, _unused, cost)
  local index, count = fixed_window_state(key, now, window)
  redis.call('SET', key, string.format('%d:%d', index, count + cost),
    'PX', ttl_ms((index + 1) * window - now))
end
