//! `provider = "kubernetes"`: replicas are the ready endpoints of a Deployment's Service, and the
//! replica count is the Deployment's `scale` subresource.

use crate::config::line;
use crate::config::table::table;

table! {
    /// The keys of `provider = "kubernetes"`, as written.
    struct RawKubernetes;

    /// `provider = "kubernetes"`.
    #[derive(Clone, Debug, PartialEq)]
    pub struct KubernetesConfig {}

    given(function: &str);

    keys {
        deployment: String => {
            /// The Deployment scaled through its `scale` subresource (default: the function's
            /// name).
            pub deployment: String = object_name(deployment, function),
        },
        service: String => {
            /// The Service whose EndpointSlices are the replicas (default: the function's name).
            pub service: String = object_name(service, function),
        },
        namespace: String => {
            /// Where both live (default: `[gateway] kubernetes_namespace`, else the namespace of
            /// the kubeconfig context or of the pod the gateway runs in).
            pub namespace: Option<String> = namespace_name(namespace),
        },
        port: String => {
            /// The EndpointSlice port requests go to: its name, or its number (default: the
            /// slice's first port).
            pub port: Option<String> = port_name(port),
        },
    }
}

impl KubernetesConfig {
    /// Appends the `check-config` lines of the kubernetes provider's keys.
    pub(super) fn describe(&self, out: &mut String) {
        line(out, "deployment", &self.deployment);
        line(out, "service", &self.service);
        line(
            out,
            "namespace",
            self.namespace
                .as_deref()
                .unwrap_or("(gateway's kubernetes_namespace, else the client's)"),
        );
        line(out, "port", self.port.as_deref().unwrap_or("(first port)"));
    }
}

/// A Kubernetes object name (an RFC 1123 DNS label, at most 63 characters).
pub fn is_dns_label(name: &str) -> bool {
    crate::config::is_valid_function_name(name)
}

fn object_name(written: Option<String>, function: &str) -> Result<String, String> {
    let name = written.unwrap_or_else(|| function.to_owned());
    if !is_dns_label(&name) {
        return Err(format!(
            "`{name}` is not a Kubernetes object name ([a-z0-9]([-a-z0-9]*[a-z0-9])?, at most 63 characters)"
        ));
    }
    Ok(name)
}

fn namespace_name(written: Option<String>) -> Result<Option<String>, String> {
    match written {
        Some(ns) if !is_dns_label(&ns) => Err(format!("`{ns}` is not a namespace name")),
        other => Ok(other),
    }
}

fn port_name(written: Option<String>) -> Result<Option<String>, String> {
    match written {
        Some(p) if p.is_empty() => Err("must not be empty".into()),
        Some(p) if p.parse::<u16>().is_ok_and(|n| n == 0) => Err("port 0 is not a port".into()),
        other => Ok(other),
    }
}
