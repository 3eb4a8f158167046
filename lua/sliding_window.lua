-- sliding_window: the two-counter approximation of a sliding window. The estimate is the
-- current window's count plus the previous window's count weighted by the share of it the
-- sliding window still covers, rounded up; a request fits when estimate + cost <= quota.
-- Because the estimate includes the whole current count, no aligned window ever admits more
-- than `quota`; inside the window the previous count is assumed evenly spread.
--
-- KEY    a hash { i = current window number, c = its count, p = previous window's count }.
-- ARGV   (the limit's slot in decide.lua) p1 = quota, p2 = window us, p3 unused.
-- Result { allowed 1|0, remaining units, reset us, retry_after us, commit,
--          receipt = the window number the units went into }.
-- TTL    until the end of the window after the current one (the current count weighs on it),
--        plus the slack.
-- The weighting uses ceil(previous * (window - elapsed) / window) evaluated in doubles, left to
-- right; the memory store evaluates it identically, so both agree to the bit.
local function sliding_window(key, now, quota, window, _, cost)
  local s = redis.call('HMGET', key, 'i', 'c', 'p')
  local index = math.floor(now / window)
  local current, previous = 0, 0
  if s[1] then
    local stored = tonumber(s[1])
    if stored >= index then
      index = stored
      current = tonumber(s[2])
      previous = tonumber(s[3])
    elseif stored == index - 1 then
      previous = tonumber(s[2])
    end
  end
  local start = index * window
  local elapsed = now - start
  if elapsed < 0 then elapsed = 0 end
  if elapsed > window then elapsed = window end
  local weighted = 0
  if previous > 0 then
    weighted = math.ceil(previous * (window - elapsed) / window)
  end
  local estimate = weighted + current
  if estimate + cost <= quota then
    local reset = start + 2 * window - now
    if reset < 0 then reset = 0 end
    return { 1, quota - estimate - cost, reset, 0, function()
      redis.call('HSET', key, 'i', index, 'c', current + cost, 'p', previous)
      expire_in(key, (index + 2) * window - now)
    end, index }
  end
  local reset = 0
  if current > 0 then
    reset = start + 2 * window - now
  elseif previous > 0 then
    reset = start + window - now
  end
  if reset < 0 then reset = 0 end
  local retry
  if quota >= cost + current and previous > 0 then
    -- smallest elapsed e with ceil(previous * (window - e) / window) <= room
    local room = quota - cost - current
    local earliest = window - math.floor(room * window / previous)
    if earliest < 0 then earliest = 0 end
    retry = earliest - elapsed
    if retry < 1 then retry = 1 end
  else
    -- wait for the next window, where this window's count becomes the weighted previous one
    local room = quota - cost
    local earliest = 0
    if current > 0 then
      local f = math.floor(room * window / current)
      if f > window then f = window end
      earliest = window - f
    end
    retry = (window - elapsed) + earliest
  end
  local remaining = quota - estimate
  if remaining < 0 then remaining = 0 end
  return { 0, remaining, reset, retry, nil, 0 }
end

-- Gives back `cost` units admitted in window `receipt`, wherever that window now sits.
local function sliding_window_refund(key, receipt, _quota, _window, _unused, cost)
  local s = redis.call('HMGET', key, 'i', 'c', 'p')
  if not s[1] then return end
  local index = tonumber(s[1])
  local field, value
  if index == receipt then
    field, value = 'c', tonumber(s[2])
  elseif index == receipt + 1 then
    field, value = 'p', tonumber(s[3])
  else
    return
  end
  value = value - cost
  if value < 0 then value = 0 end
  redis.call('HSET', key, field, value)
end
