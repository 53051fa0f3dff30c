-- show_doc writes a class's signature as a call, `def Name(...)`, taken from its `__init__`.
-- A dataclass's generated `__init__` is annotated `-> None`, which reads as if the class returned
-- nothing; a signature whose name is capitalised (a class) loses that `->None`.
function CodeBlock(block)
  if block.text:match("^def %u") then
    block.text = block.text:gsub("%)%->None:", "):", 1)
  end
  return block
end
