"""genai-lab chat: every model the project has as a LangChain chat model, a conversational chain
with SQLite-backed memory and concept retrieval, and the `genai-lab chat` command.

    from chat.providers import load_chat_model      # "tutor", "PATH", "PATH+ADAPTER", "openai:gpt-4o"
    from chat.conversations import ChatStore            # conversations in SQLite, one thread id each
    from chat.session import ChatSession         # ask / stream one thread with one model
    from chat.retrieval import ConceptRetriever  # MiniLM over core.content.concepts, cites dashboard pages

Modules: local_model (ChatLocalModel: our GPT, transformers models and LoRA adapters as one
BaseChatModel over core's decoding loop), models (the spec factory over core's resolver), chain
(context budget and LCEL chain), retrieval, memory (LangGraph graph + SqliteSaver), session, cli. Nothing is imported
here, so `genai-lab` starts fast whichever subcommand runs.
"""
