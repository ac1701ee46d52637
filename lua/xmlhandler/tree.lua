--- xmlhandler.tree: the handler that turns a document into nested tables, for
-- `xml2lua.parser(handler)` (lua/xml2lua.lua). Written for moongate after the library's
-- documented shape:
--   - an element is a key of its parent, named as in the document (prefix included);
--   - repeated sibling elements become an array under that key (`options.noreduce[name]`
--     makes it an array even for one);
--   - an element with only text becomes that string; with attributes, they are under
--     `_attr` and the text is at `[1]`;
--   - an empty element is an empty table.
-- `handler.root` holds the result.
local pairs = pairs
local type = type
local next = next
local setmetatable = setmetatable

local tree = {}
tree.__index = tree

-- parent table -> the set of its keys that already hold an array of sibling elements
local arrays = setmetatable({}, { __mode = "k" })

--- A fresh handler.
function tree:new()
    return setmetatable({ root = {}, options = { noreduce = {} }, _stack = nil }, tree)
end

-- an element holding only one text piece is that text
local function leaf(node)
    local k, v = next(node)
    if k == 1 and type(v) == "string" and next(node, k) == nil then
        return v
    end
    return node
end

-- Adds `value` under `name`: alone the first time, then as an array of the siblings.
local function add(h, parent, name, value)
    local marks = arrays[parent]
    if not marks then
        marks = {}
        arrays[parent] = marks
    end
    local old = parent[name]
    if marks[name] then
        old[#old + 1] = value
    elseif old == nil and not h.options.noreduce[name] then
        parent[name] = value
    else
        parent[name] = old == nil and { value } or { old, value }
        marks[name] = true
    end
end

function tree:starttag(tag)
    local stack = self._stack
    if not stack then
        stack = { self.root }
        self._stack = stack
    end
    local node = {}
    if tag.attrs and next(tag.attrs) ~= nil then
        node._attr = tag.attrs
    end
    stack[#stack + 1] = node
end

function tree:endtag(tag)
    local stack = self._stack
    if not stack or #stack < 2 then
        error("xmlhandler.tree: close tag </" .. tag.name .. "> without an open one", 2)
    end
    local node = stack[#stack]
    stack[#stack] = nil
    add(self, stack[#stack], tag.name, leaf(node))
end

function tree:text(text)
    local stack = self._stack
    if not stack or #stack < 2 then
        return -- text outside the document element
    end
    local node = stack[#stack]
    node[#node + 1] = text
end

tree.cdata = tree.text

-- The module is a handler too, for code that uses `require("xmlhandler.tree")` as it is.
tree.root = {}
tree.options = { noreduce = {} }

return tree
