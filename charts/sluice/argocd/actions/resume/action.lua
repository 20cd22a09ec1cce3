-- Argo CD action "resume" of a StreamingQuery: the engine pods start again
-- from the checkpoint (spec.suspend: false). See ../discovery.lua.
if obj.spec == nil then
  obj.spec = {}
end
obj.spec.suspend = false
return obj
