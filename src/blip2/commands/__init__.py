"""The usage commands: `blip2 caption`, `ask`, `match`, `search` and `serve` (one module each, see
`blip2.cli`); `common` holds their shared options and model loading."""
