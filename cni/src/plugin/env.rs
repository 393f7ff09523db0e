//! The CNI_* environment and the Kubernetes pod identity in CNI_ARGS.

/// The CNI environment variables the runtime sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

impl Env {
    /// Reads CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH.
    pub fn from_process() -> Self {
        let var = |name: &str| {
            std::env::var_os(name)
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: var("CNI_PATH"),
        }
    }
}

/// The pod identity kubelet passes in CNI_ARGS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub container_id: String,
}

impl Pod {
    /// None when CNI_ARGS lacks the pod's name or namespace: the sandbox is
    /// not a Kubernetes pod, so the mesh has nothing to do with it.
    pub fn from_args(args: &str, fallback_container_id: &str) -> Option<Self> {
        let mut pod = Self {
            namespace: String::new(),
            name: String::new(),
            uid: None,
            container_id: fallback_container_id.to_string(),
        };
        // Malformed pairs are skipped: CNI_ARGS also carries other plugins' keys.
        for (key, value) in args.split(';').filter_map(|kv| kv.split_once('=')) {
            match key.trim() {
                "K8S_POD_NAMESPACE" => pod.namespace = value.to_string(),
                "K8S_POD_NAME" => pod.name = value.to_string(),
                "K8S_POD_UID" if !value.is_empty() => pod.uid = Some(value.to_string()),
                "K8S_POD_INFRA_CONTAINER_ID" if !value.is_empty() => {
                    pod.container_id = value.to_string()
                }
                _ => {}
            }
        }
        (!pod.namespace.is_empty() && !pod.name.is_empty()).then_some(pod)
    }
}
