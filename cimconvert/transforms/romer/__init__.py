"""What ROMER puts into a model: stock top-k routing rules (:mod:`.routing`), the digital routing hook
(:mod:`.hook`), expert copies (:mod:`.replacement`), the MoE layer discovery (:mod:`.moe`) and the bundle
loaders of its two manifest transform types (:mod:`.loader`)."""
