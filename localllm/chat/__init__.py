"""Chat templates, tool-call and thinking parsers, structured-output grammars."""
