-- Test harness for the Argo CD resource actions of StreamingQuery
-- (charts/sluice/argocd/actions/): discovery.lua and each action's
-- action.lua, run by e2e/argocd-health.sh:
--
--   lua5.4 e2e/argocd-health/actions.lua charts/sluice/argocd/actions
--
-- Each script is loaded afresh with `obj` as its only extra global, in an
-- environment with the base library and, as Argo CD's sandbox offers it,
-- `require("os")`; a script that sets a global fails. Prints one line per
-- case, then "argocd-actions: P passed, F failed"; exits 1 if any failed.

local dir = arg[1] or "charts/sluice/argocd/actions"

local function deep_copy(value)
  if type(value) ~= "table" then
    return value
  end
  local copy = {}
  for k, v in pairs(value) do
    copy[k] = deep_copy(v)
  end
  return copy
end

local function run(path, obj)
  local env = {
    obj = obj,
    ipairs = ipairs, pairs = pairs, next = next, select = select,
    type = type, tostring = tostring, tonumber = tonumber,
    string = string, table = table, math = math,
    require = function(name)
      if name == "os" then
        return { date = os.date, time = os.time }
      end
      error("require of " .. tostring(name) .. " is not allowed", 2)
    end,
  }
  setmetatable(env, {
    __newindex = function(_, key)
      error("action script set the global '" .. tostring(key) .. "'", 2)
    end,
  })
  local chunk, err
  if setfenv then
    chunk, err = loadfile(path)
    if chunk then setfenv(chunk, env) end
  else
    chunk, err = loadfile(path, "t", env)
  end
  if not chunk then
    return nil, "cannot load " .. path .. ": " .. tostring(err)
  end
  local ok, out = pcall(chunk)
  if not ok then
    return nil, "error: " .. tostring(out)
  end
  if type(out) ~= "table" then
    return nil, "returned " .. type(out) .. " instead of a table"
  end
  return out
end

local function query(spec, metadata)
  return {
    apiVersion = "sluice.dev/v1alpha1",
    kind = "StreamingQuery",
    metadata = metadata or { name = "orders", namespace = "default", generation = 3 },
    spec = spec,
    status = { phase = "Running", observedGeneration = 3 },
  }
end

local running = { query = "SELECT * FROM orders", sources = { { name = "orders" } } }
local suspended = { query = "SELECT * FROM orders", suspend = true }

local passed, failed = 0, 0
local function case(name, problem)
  if problem then
    failed = failed + 1
    print("FAIL " .. name .. ": " .. problem)
  else
    passed = passed + 1
    print("ok   " .. name)
  end
end

-- discovery: which actions a query offers
local function offered(obj)
  local actions, err = run(dir .. "/discovery.lua", obj)
  if not actions then
    return nil, err
  end
  local out = {}
  for _, name in ipairs({ "suspend", "resume", "restart" }) do
    local a = actions[name]
    if type(a) ~= "table" then
      return nil, "no action " .. name
    end
    if type(a.iconClass) ~= "string" then
      return nil, name .. " has no iconClass"
    end
    out[name] = not a.disabled
  end
  for name in pairs(actions) do
    if out[name] == nil then
      return nil, "unexpected action " .. tostring(name)
    end
  end
  return out
end

local function expect_offered(name, obj, want)
  local got, err = offered(obj)
  if not got then
    return case(name, err)
  end
  for action, enabled in pairs(want) do
    if got[action] ~= enabled then
      return case(name, string.format("%s is %s, want %s", action,
        got[action] and "enabled" or "disabled", enabled and "enabled" or "disabled"))
    end
  end
  case(name)
end

expect_offered("a running query offers suspend and restart", query(running),
  { suspend = true, resume = false, restart = true })
expect_offered("a query without spec.suspend is running", query({ query = "SELECT 1" }),
  { suspend = true, resume = false, restart = true })
expect_offered("a suspended query offers resume only", query(suspended),
  { suspend = false, resume = true, restart = false })
expect_offered("spec.suspend: false is running", query({ suspend = false }),
  { suspend = true, resume = false, restart = true })

-- suspend and resume change spec.suspend and nothing else
do
  local before = query(running)
  local out, err = run(dir .. "/suspend/action.lua", deep_copy(before))
  if not out then
    case("suspend sets spec.suspend: true", err)
  elseif out.spec.suspend ~= true or out.spec.query ~= before.spec.query
      or out.spec.sources[1].name ~= "orders" or out.metadata.name ~= "orders" then
    case("suspend sets spec.suspend: true", "spec.suspend is " .. tostring(out.spec.suspend))
  else
    case("suspend sets spec.suspend: true and keeps the rest")
    expect_offered("after suspend, resume is offered", out,
      { suspend = false, resume = true, restart = false })
    local back, err2 = run(dir .. "/resume/action.lua", deep_copy(out))
    if not back then
      case("resume sets spec.suspend: false", err2)
    elseif back.spec.suspend ~= false or back.spec.query ~= before.spec.query then
      case("resume sets spec.suspend: false", "spec.suspend is " .. tostring(back.spec.suspend))
    else
      case("resume sets spec.suspend: false and keeps the rest")
      expect_offered("after resume, suspend and restart are offered", back,
        { suspend = true, resume = false, restart = true })
    end
  end
end

-- restart sets the annotation to the time, keeping other annotations
do
  local obj = query(running, { name = "orders", annotations = { team = "risk" } })
  local out, err = run(dir .. "/restart/action.lua", obj)
  local at = out and out.metadata.annotations["sluice.dev/restartedAt"]
  if not out then
    case("restart sets sluice.dev/restartedAt", err)
  elseif type(at) ~= "string" or not at:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$") then
    case("restart sets sluice.dev/restartedAt", "annotation is " .. tostring(at))
  elseif out.metadata.annotations.team ~= "risk" or out.spec.suspend ~= nil then
    case("restart sets sluice.dev/restartedAt", "other fields changed")
  else
    local y, mo, d, h, mi, s = at:match("^(%d+)%-(%d+)%-(%d+)T(%d+):(%d+):(%d+)Z$")
    local when = os.time({ year = tonumber(y), month = tonumber(mo), day = tonumber(d),
                           hour = tonumber(h), min = tonumber(mi), sec = tonumber(s) })
    local utc_now = os.time(os.date("!*t"))
    if math.abs(when - utc_now) > 120 then
      case("restart sets sluice.dev/restartedAt", "the time " .. at .. " is not now (UTC)")
    else
      case("restart sets sluice.dev/restartedAt to now, UTC (" .. at .. "), keeping other annotations")
    end
  end
  local bare, err2 = run(dir .. "/restart/action.lua", { kind = "StreamingQuery", spec = {} })
  if not bare then
    case("restart of an object without metadata", err2)
  elseif type(bare.metadata.annotations["sluice.dev/restartedAt"]) ~= "string" then
    case("restart of an object without metadata", "no annotation")
  else
    case("restart of an object without metadata or annotations")
  end
end

print(string.format("argocd-actions: %d passed, %d failed", passed, failed))
os.exit(failed == 0 and 0 or 1)
