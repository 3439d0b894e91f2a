"""HTTP routes; each module holds one APIRouter. Routes stay thin: parse, call, shape."""
